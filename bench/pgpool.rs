//! Pgpool-II (Debian package `pgpool2`) in native replication mode in
//! front of local nodes: the closest existing system to Reprise (a proxy
//! that sends every write to every copy and balances reads).

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use reprise::local::LocalNode;

pub struct Pgpool {
    pub port: u16,
    child: Child,
}

impl Pgpool {
    /// Starts pgpool with a generated pgpool.conf under `dir`/pgpool.
    pub fn start(dir: &Path, nodes: &[&LocalNode], clients: usize) -> anyhow::Result<Pgpool> {
        let exe = ["/usr/sbin/pgpool", "/usr/bin/pgpool"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| anyhow::anyhow!("pgpool is not installed (apt-get install pgpool2)"))?;
        let port = free_port()?;
        let pcp_port = free_port()?;
        let pdir = dir.join("pgpool");
        std::fs::create_dir_all(&pdir)?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{d}'\n\
             pcp_listen_addresses = ''\n\
             pcp_port = {pcp_port}\n\
             pcp_socket_dir = '{d}'\n\
             backend_clustering_mode = 'native_replication'\n\
             load_balance_mode = on\n\
             enable_pool_hba = off\n\
             pool_passwd = ''\n\
             num_init_children = {children}\n\
             max_pool = 1\n\
             health_check_period = 0\n\
             sr_check_period = 0\n\
             failover_on_backend_error = off\n\
             pid_file_name = '{d}/pgpool.pid'\n\
             logdir = '{d}'\n\
             log_destination = 'stderr'\n",
            d = pdir.display(),
            // One pgpool child per client, and a few spare for setup.
            children = clients + 4,
        );
        for (i, n) in nodes.iter().enumerate() {
            // The socket directory, as Reprise reaches the nodes.
            conf += &format!(
                "backend_hostname{i} = '{}'\nbackend_port{i} = {}\nbackend_weight{i} = 1\n\
                 backend_data_directory{i} = '{}'\nbackend_flag{i} = 'DISALLOW_TO_FAILOVER'\n",
                n.socket_dir().display(),
                n.port(),
                n.data_dir().display()
            );
        }
        let conf_file = pdir.join("pgpool.conf");
        std::fs::write(&conf_file, conf)?;
        std::fs::write(pdir.join("pcp.conf"), "")?;
        std::fs::write(pdir.join("pool_hba.conf"), "")?;
        let log = std::fs::File::create(pdir.join("pgpool.log"))?;
        let mut cmd = Command::new(exe);
        as_postgres(&mut cmd, &pdir)?;
        let child = cmd
            .args(["-n", "-D", "-f"])
            .arg(&conf_file)
            .arg("-F")
            .arg(pdir.join("pcp.conf"))
            .arg("-a")
            .arg(pdir.join("pool_hba.conf"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut p = Pgpool { port, child };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                anyhow::bail!(
                    "pgpool exited ({status}); see {}",
                    pdir.join("pgpool.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = p.child.kill();
        anyhow::bail!(
            "pgpool did not start; see {}",
            pdir.join("pgpool.log").display()
        )
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Pgpool {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (SIGTERM would wait for clients).
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// As root, runs `cmd` as the `postgres` user (directly, so the child is
/// the server itself and a signal reaches it) and gives it `dir`.
pub fn as_postgres(cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let name = std::ffi::CString::new("postgres")?;
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    anyhow::ensure!(
        !pw.is_null(),
        "running as root but user `postgres` does not exist"
    );
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()?;
    anyhow::ensure!(status.success(), "chown {} failed", dir.display());
    cmd.uid(uid).gid(gid).env("HOME", dir);
    Ok(())
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
