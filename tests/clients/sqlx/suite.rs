//! The SQLx suite (tests/clients/README.md), run in-process by
//! tests/clients.rs: the common features plus `statement_cache`,
//! `transactions` (`begin`, commit, rollback, nested savepoints) and `pool`.
//! SQLx has no cancel API: `cancel` is checked with `statement_timeout`,
//! which ends the query with the same 57014.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor};

use crate::{Record, Target, ensure, feature};

const APP: &str = "compat-sqlx";

type Check = Result<String, String>;

pub fn run(target: Target) -> Pin<Box<dyn Future<Output = Vec<Record>> + Send>> {
    Box::pin(suite(target))
}

async fn suite(t: Target) -> Vec<Record> {
    vec![
        feature("routing", routing(&t)).await,
        feature("read_own_write", read_own_write(&t)).await,
        feature("error_recovery", error_recovery(&t)).await,
        feature("cancel", cancel(&t)).await,
        feature("transaction", transaction(&t)).await,
        feature("statement_cache", statement_cache(&t)).await,
        feature("transactions", transactions(&t)).await,
        feature("pool", pool(&t)).await,
    ]
}

/// An SQLx error as "what: SQLSTATE message".
trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T> Ctx<T> for Result<T, sqlx::Error> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {}", describe(&e)))
    }
}

fn describe(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => format!("{} {}", d.code().unwrap_or_default(), d.message()),
        None => e.to_string(),
    }
}

/// The SQLSTATE of an error, if the server sent one.
fn code(r: Result<impl Sized, sqlx::Error>) -> (Option<String>, String) {
    match r {
        Ok(_) => (None, "succeeded".into()),
        Err(e) => (
            e.as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.to_string()),
            describe(&e),
        ),
    }
}

fn options(t: &Target) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&t.host)
        .port(t.port)
        .username(&t.user)
        .database(&t.db)
        .application_name(APP)
}

async fn connect(t: &Target) -> Result<PgConnection, String> {
    PgConnection::connect_with(&options(t)).await.ctx("connect")
}

/// `DROP TABLE IF EXISTS` then `CREATE TABLE compat_sqlx_<name> (<columns>)`,
/// in one simple query.
async fn fresh_table(c: &mut PgConnection, name: &str, columns: &str) -> Result<(), String> {
    let table = format!("compat_sqlx_{name}");
    c.execute(format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({columns})").as_str())
        .await
        .ctx(&format!("create {table}"))
        .map(drop)
}

async fn ids(c: &mut PgConnection, table: &str) -> Result<Vec<i32>, String> {
    sqlx::query_scalar(&format!("SELECT id FROM {table} ORDER BY id"))
        .fetch_all(c)
        .await
        .ctx(&format!("read {table}"))
}

async fn routing(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "reads", "id int PRIMARY KEY, v text").await?;
    fresh_table(&mut c, "writes", "id int PRIMARY KEY, v text").await?;
    sqlx::query("INSERT INTO compat_sqlx_reads SELECT g, 'v' || g FROM generate_series(1, 10) g")
        .execute(&mut c)
        .await
        .ctx("fill compat_sqlx_reads")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for k in 0..20 {
        let id: i32 = k % 10 + 1;
        let v: String = sqlx::query_scalar("SELECT v FROM compat_sqlx_reads WHERE id = $1")
            .bind(id)
            .fetch_one(&mut c)
            .await
            .ctx("read")?;
        ensure(v == format!("v{id}"), || format!("row {id} read {v:?}"))?;
    }
    for id in 1..=5i32 {
        sqlx::query("INSERT INTO compat_sqlx_writes (id, v) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("w{id}"))
            .execute(&mut c)
            .await
            .ctx("insert")?;
    }
    Ok("20 parameterised reads, 5 inserts".into())
}

async fn read_own_write(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "own", "id int PRIMARY KEY, v text").await?;
    for id in 1..=5i32 {
        let v = format!("mine {id}");
        sqlx::query("INSERT INTO compat_sqlx_own (id, v) VALUES ($1, $2)")
            .bind(id)
            .bind(&v)
            .execute(&mut c)
            .await
            .ctx("insert")?;
        let got: Option<String> = sqlx::query_scalar("SELECT v FROM compat_sqlx_own WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut c)
            .await
            .ctx("select")?;
        ensure(got.as_deref() == Some(v.as_str()), || {
            format!("row {id} right after its insert: {got:?}")
        })?;
    }
    Ok("5 inserts, each read back at once".into())
}

async fn error_recovery(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "errors", "id int PRIMARY KEY").await?;
    let missing = "SELECT * FROM compat_sqlx_missing";
    let (got, text) = code(sqlx::query(missing).fetch_all(&mut c).await);
    ensure(got.as_deref() == Some("42P01"), || {
        format!("missing table: {text}")
    })?;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut c)
        .await
        .ctx("after the error")?;
    ensure(one == 1, || format!("SELECT 1 gave {one}"))?;

    c.execute("BEGIN").await.ctx("begin")?;
    sqlx::query("INSERT INTO compat_sqlx_errors VALUES ($1)")
        .bind(1i32)
        .execute(&mut c)
        .await
        .ctx("insert in the transaction")?;
    let (got, text) = code(sqlx::query(missing).fetch_all(&mut c).await);
    ensure(got.as_deref() == Some("42P01"), || {
        format!("missing table in a transaction: {text}")
    })?;
    c.execute("ROLLBACK").await.ctx("rollback")?;
    c.execute("BEGIN").await.ctx("next begin")?;
    sqlx::query("INSERT INTO compat_sqlx_errors VALUES ($1)")
        .bind(2i32)
        .execute(&mut c)
        .await
        .ctx("insert in the next transaction")?;
    c.execute("COMMIT").await.ctx("commit")?;
    let got = ids(&mut c, "compat_sqlx_errors").await?;
    ensure(got == [2], || {
        format!("rows after rollback and commit: {got:?}")
    })?;
    Ok("42P01, then the connection works; in a transaction too, after ROLLBACK".into())
}

async fn cancel(t: &Target) -> Check {
    let mut c = connect(t).await?;
    c.execute("SET statement_timeout = 500").await.ctx("set")?;
    let start = Instant::now();
    let (got, text) = code(sqlx::query("SELECT pg_sleep(10)").execute(&mut c).await);
    let took = start.elapsed();
    ensure(got.as_deref() == Some("57014"), || {
        format!("pg_sleep(10) under statement_timeout: {text}")
    })?;
    ensure(took < Duration::from_secs(5), || {
        format!("it took {took:?}")
    })?;
    c.execute("RESET statement_timeout").await.ctx("reset")?;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut c)
        .await
        .ctx("after the timeout")?;
    ensure(one == 1, || format!("SELECT 1 gave {one}"))?;
    Ok(format!(
        "SQLx has no cancel API: statement_timeout = 500 ms ended pg_sleep(10) with 57014 \
         after {} ms, connection usable",
        took.as_millis()
    ))
}

async fn transaction(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "tx", "id int PRIMARY KEY").await?;
    let insert = "INSERT INTO compat_sqlx_tx VALUES ($1)";
    c.execute("BEGIN").await.ctx("begin")?;
    for id in [1i32, 2] {
        sqlx::query(insert)
            .bind(id)
            .execute(&mut c)
            .await
            .ctx("insert")?;
    }
    c.execute("COMMIT").await.ctx("commit")?;
    c.execute("BEGIN").await.ctx("begin")?;
    sqlx::query(insert)
        .bind(3i32)
        .execute(&mut c)
        .await
        .ctx("insert")?;
    c.execute("ROLLBACK").await.ctx("rollback")?;
    let got = ids(&mut c, "compat_sqlx_tx").await?;
    ensure(got == [1, 2], || format!("rows: {got:?}"))?;
    Ok("committed rows only".into())
}

async fn statement_cache(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "cache", "id int PRIMARY KEY, v text").await?;
    let before = c.cached_statements_size();
    for id in 1..=20i32 {
        sqlx::query("INSERT INTO compat_sqlx_cache (id, v) VALUES ($1, $2)")
            .bind(id)
            .bind(format!("c{id}"))
            .execute(&mut c)
            .await
            .ctx("cached insert")?;
    }
    for id in 1..=20i32 {
        let v: String = sqlx::query_scalar("SELECT v FROM compat_sqlx_cache WHERE id = $1")
            .bind(id)
            .fetch_one(&mut c)
            .await
            .ctx("cached select")?;
        ensure(v == format!("c{id}"), || format!("row {id}: {v:?}"))?;
    }
    let cached = c.cached_statements_size() - before;
    ensure(cached == 2, || {
        format!("{cached} statements cached for 2 distinct queries")
    })?;
    Ok("2 statements prepared once each, executed 20 times each".into())
}

async fn transactions(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "txapi", "id int PRIMARY KEY").await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options(t))
        .await
        .ctx("pool")?;
    let insert = "INSERT INTO compat_sqlx_txapi VALUES ($1)";

    let mut tx = pool.begin().await.ctx("begin")?;
    sqlx::query(insert)
        .bind(1i32)
        .execute(&mut *tx)
        .await
        .ctx("insert 1")?;
    tx.commit().await.ctx("commit")?;

    let mut tx = pool.begin().await.ctx("begin")?;
    sqlx::query(insert)
        .bind(2i32)
        .execute(&mut *tx)
        .await
        .ctx("insert 2")?;
    tx.rollback().await.ctx("rollback")?;

    let mut tx = pool.begin().await.ctx("begin")?;
    sqlx::query(insert)
        .bind(3i32)
        .execute(&mut *tx)
        .await
        .ctx("insert 3")?;
    drop(tx); // rolls back when the connection returns to the pool

    let mut tx = pool.begin().await.ctx("begin")?;
    sqlx::query(insert)
        .bind(4i32)
        .execute(&mut *tx)
        .await
        .ctx("insert 4")?;
    let mut inner = tx.begin().await.ctx("savepoint")?;
    sqlx::query(insert)
        .bind(5i32)
        .execute(&mut *inner)
        .await
        .ctx("insert 5")?;
    inner.rollback().await.ctx("rollback to savepoint")?;
    let mut inner = tx.begin().await.ctx("savepoint")?;
    sqlx::query(insert)
        .bind(6i32)
        .execute(&mut *inner)
        .await
        .ctx("insert 6")?;
    inner.commit().await.ctx("release savepoint")?;
    let seen: Vec<i32> = sqlx::query_scalar("SELECT id FROM compat_sqlx_txapi ORDER BY id")
        .fetch_all(&mut *tx)
        .await
        .ctx("read in the transaction")?;
    tx.commit().await.ctx("commit")?;
    ensure(seen == [1, 4, 6], || {
        format!("the transaction saw {seen:?}")
    })?;

    // A plain connection's transaction, too.
    let mut tx = c.begin().await.ctx("begin on a connection")?;
    sqlx::query(insert)
        .bind(7i32)
        .execute(&mut *tx)
        .await
        .ctx("insert 7")?;
    tx.commit().await.ctx("commit")?;
    pool.close().await;
    let got = ids(&mut c, "compat_sqlx_txapi").await?;
    ensure(got == [1, 4, 6, 7], || format!("rows: {got:?}"))?;
    Ok(
        "pool.begin: commit, rollback, rollback on drop, nested savepoints; connection.begin"
            .into(),
    )
}

async fn pool(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&mut c, "pool", "id int PRIMARY KEY, v text").await?;
    sqlx::query("INSERT INTO compat_sqlx_pool SELECT g, 'v' || g FROM generate_series(1, 40) g")
        .execute(&mut c)
        .await
        .ctx("fill")?;
    // Other sessions read it: give the subscribers time to apply it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(10)
        .connect_with(options(t))
        .await
        .ctx("pool")?;
    let queries = (1..=50i32).map(|k| {
        let pool = &pool;
        async move {
            if k <= 40 {
                let v: String = sqlx::query_scalar("SELECT v FROM compat_sqlx_pool WHERE id = $1")
                    .bind(k)
                    .fetch_one(pool)
                    .await
                    .ctx(&format!("read {k}"))?;
                ensure(v == format!("v{k}"), || format!("row {k}: {v:?}"))
            } else {
                sqlx::query("INSERT INTO compat_sqlx_pool (id, v) VALUES ($1, $2)")
                    .bind(k)
                    .bind(format!("v{k}"))
                    .execute(pool)
                    .await
                    .ctx(&format!("insert {k}"))
                    .map(drop)
            }
        }
    });
    let results = join_all(queries).await;
    let size = pool.size();
    pool.close().await;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    ensure(failed.is_empty(), || failed.join("; "))?;
    ensure(size <= 10, || format!("the pool opened {size} connections"))?;
    Ok(format!(
        "50 concurrent queries (40 reads, 10 inserts) over {size} connections"
    ))
}
