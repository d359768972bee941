//! The tokio-postgres suite (tests/clients/README.md), run in-process by
//! tests/clients.rs: the common features plus `prepared_statements`,
//! `binary_types`, `copy_in_out`, `pipelining` and `transactions` (the
//! Transaction API: commit, rollback on drop, savepoints, isolation and
//! read-only transactions).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, IsolationLevel, NoTls};

use crate::{Record, Target, ensure, feature};

const APP: &str = "compat-tokio_postgres";

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
        feature("prepared_statements", prepared_statements(&t)).await,
        feature("binary_types", binary_types(&t)).await,
        feature("pipelining", pipelining(&t)).await,
        feature("transactions", transactions(&t)).await,
        // Last: a COPY left hanging holds the group's write lock.
        feature("copy_in_out", copy_in_out(&t)).await,
    ]
}

/// A tokio-postgres error as "what: SQLSTATE message".
trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T> Ctx<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {}", describe(&e)))
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// A client whose connection closes when it is dropped, even with a
/// request in flight (a feature that timed out).
struct Conn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(t: &Target) -> Result<Conn, String> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(&t.host)
        .port(t.port)
        .user(&t.user)
        .dbname(&t.db)
        .application_name(APP)
        .connect(NoTls)
        .await
        .ctx("connect")?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { client, task })
}

/// `DROP TABLE IF EXISTS` then `CREATE TABLE compat_tokio_postgres_<name> (<columns>)`.
async fn fresh_table(c: &Client, name: &str, columns: &str) -> Result<(), String> {
    let table = format!("compat_tokio_postgres_{name}");
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({columns})"
    ))
    .await
    .ctx(&format!("create {table}"))
}

async fn ids(c: &Client, table: &str) -> Result<Vec<i32>, String> {
    let rows = c
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .ctx(&format!("read {table}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn routing(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "reads", "id int PRIMARY KEY, v text").await?;
    fresh_table(&c, "writes", "id int PRIMARY KEY, v text").await?;
    c.execute(
        "INSERT INTO compat_tokio_postgres_reads SELECT g, 'v' || g FROM generate_series(1, 10) g",
        &[],
    )
    .await
    .ctx("fill compat_tokio_postgres_reads")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for k in 0..20 {
        let id: i32 = k % 10 + 1;
        let v: String = c
            .query_one(
                "SELECT v FROM compat_tokio_postgres_reads WHERE id = $1",
                &[&id],
            )
            .await
            .ctx("read")?
            .get(0);
        ensure(v == format!("v{id}"), || format!("row {id} read {v:?}"))?;
    }
    for id in 1..=5 {
        c.execute(
            "INSERT INTO compat_tokio_postgres_writes (id, v) VALUES ($1, $2)",
            &[&id, &format!("w{id}")],
        )
        .await
        .ctx("insert")?;
    }
    Ok("20 parameterised reads, 5 inserts".into())
}

async fn read_own_write(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "own", "id int PRIMARY KEY, v text").await?;
    for id in 1..=5 {
        let v = format!("mine {id}");
        c.execute(
            "INSERT INTO compat_tokio_postgres_own (id, v) VALUES ($1, $2)",
            &[&id, &v],
        )
        .await
        .ctx("insert")?;
        let got: Option<String> = c
            .query_opt(
                "SELECT v FROM compat_tokio_postgres_own WHERE id = $1",
                &[&id],
            )
            .await
            .ctx("select")?
            .map(|r| r.get(0));
        ensure(got.as_deref() == Some(v.as_str()), || {
            format!("row {id} right after its insert: {got:?}")
        })?;
    }
    Ok("5 inserts, each read back at once".into())
}

async fn error_recovery(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "errors", "id int PRIMARY KEY").await?;
    let missing = "SELECT * FROM compat_tokio_postgres_missing";
    let e = c.query(missing, &[]).await.err();
    let code = e.as_ref().and_then(|e| e.code()).cloned();
    ensure(code == Some(SqlState::UNDEFINED_TABLE), || {
        format!("missing table: {:?}", e.map(|e| describe(&e)))
    })?;
    let one: i32 = c
        .query_one("SELECT 1", &[])
        .await
        .ctx("after the error")?
        .get(0);
    ensure(one == 1, || format!("SELECT 1 gave {one}"))?;

    c.batch_execute("BEGIN").await.ctx("begin")?;
    c.execute("INSERT INTO compat_tokio_postgres_errors VALUES (1)", &[])
        .await
        .ctx("insert in the transaction")?;
    let e = c.query(missing, &[]).await.err();
    let code = e.as_ref().and_then(|e| e.code()).cloned();
    ensure(code == Some(SqlState::UNDEFINED_TABLE), || {
        format!(
            "missing table in a transaction: {:?}",
            e.map(|e| describe(&e))
        )
    })?;
    let e = c.query("SELECT 1", &[]).await.err();
    let code = e.as_ref().and_then(|e| e.code()).cloned();
    ensure(code == Some(SqlState::IN_FAILED_SQL_TRANSACTION), || {
        format!(
            "a statement in the failed transaction: {:?}",
            e.map(|e| describe(&e))
        )
    })?;
    c.batch_execute("ROLLBACK").await.ctx("rollback")?;
    c.batch_execute("BEGIN").await.ctx("next begin")?;
    c.execute("INSERT INTO compat_tokio_postgres_errors VALUES (2)", &[])
        .await
        .ctx("insert in the next transaction")?;
    c.batch_execute("COMMIT").await.ctx("commit")?;
    let got = ids(&c, "compat_tokio_postgres_errors").await?;
    ensure(got == [2], || {
        format!("rows after rollback and commit: {got:?}")
    })?;
    Ok(
        "42P01, then the connection works; in a transaction 42P01, 25P02, rollback, next commit"
            .into(),
    )
}

async fn cancel(t: &Target) -> Check {
    let c = connect(t).await?;
    let token = c.cancel_token();
    let start = Instant::now();
    let sleep = c.query("SELECT pg_sleep(10)", &[]);
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    };
    let (slept, cancelled) = tokio::join!(sleep, cancel);
    let took = start.elapsed();
    cancelled.ctx("cancel request")?;
    let e = slept.err();
    let code = e.as_ref().and_then(|e| e.code()).cloned();
    ensure(code == Some(SqlState::QUERY_CANCELED), || {
        format!("pg_sleep(10) after cancel: {:?}", e.map(|e| describe(&e)))
    })?;
    ensure(took < Duration::from_secs(5), || {
        format!("cancel took {took:?}")
    })?;
    let one: i32 = c
        .query_one("SELECT 1", &[])
        .await
        .ctx("after cancel")?
        .get(0);
    ensure(one == 1, || format!("SELECT 1 gave {one}"))?;
    Ok(format!(
        "57014 after {} ms, connection usable",
        took.as_millis()
    ))
}

async fn transaction(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "tx", "id int PRIMARY KEY").await?;
    let insert = "INSERT INTO compat_tokio_postgres_tx VALUES ($1)";
    c.batch_execute("BEGIN").await.ctx("begin")?;
    c.execute(insert, &[&1]).await.ctx("insert 1")?;
    c.execute(insert, &[&2]).await.ctx("insert 2")?;
    c.batch_execute("COMMIT").await.ctx("commit")?;
    c.batch_execute("BEGIN").await.ctx("begin")?;
    c.execute(insert, &[&3]).await.ctx("insert 3")?;
    c.batch_execute("ROLLBACK").await.ctx("rollback")?;
    let got = ids(&c, "compat_tokio_postgres_tx").await?;
    ensure(got == [1, 2], || format!("rows: {got:?}"))?;
    Ok("committed rows only".into())
}

async fn prepared_statements(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "prep", "id int PRIMARY KEY, v text").await?;
    let insert = c
        .prepare("INSERT INTO compat_tokio_postgres_prep (id, v) VALUES ($1, $2)")
        .await
        .ctx("prepare insert")?;
    let select = c
        .prepare_typed(
            "SELECT v, length(v) FROM compat_tokio_postgres_prep WHERE id = $1",
            &[Type::INT4],
        )
        .await
        .ctx("prepare select")?;
    ensure(insert.params() == [Type::INT4, Type::TEXT], || {
        format!("insert parameter types {:?}", insert.params())
    })?;
    let columns: Vec<(&str, &Type)> = select
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_()))
        .collect();
    ensure(
        columns == [("v", &Type::TEXT), ("length", &Type::INT4)],
        || format!("select columns {columns:?}"),
    )?;
    for id in 1..=10 {
        let v = format!("p{id}");
        let n = c.execute(&insert, &[&id, &v]).await.ctx("execute insert")?;
        ensure(n == 1, || format!("insert {id} reported {n} rows"))?;
        let row = c.query_one(&select, &[&id]).await.ctx("execute select")?;
        let (got, len): (String, i32) = (row.get(0), row.get(1));
        ensure(got == v && len == v.len() as i32, || {
            format!("row {id}: {got:?} {len}")
        })?;
    }
    // The same statements inside a transaction, then reused after it.
    c.batch_execute("BEGIN").await.ctx("begin")?;
    c.execute(&insert, &[&11, &"p11"])
        .await
        .ctx("insert in a transaction")?;
    c.query_one(&select, &[&11])
        .await
        .ctx("select in a transaction")?;
    c.batch_execute("COMMIT").await.ctx("commit")?;
    let got: String = c.query_one(&select, &[&11]).await.ctx("select")?.get(0);
    ensure(got == "p11", || format!("row 11: {got:?}"))?;
    Ok("2 named statements, typed parameters and columns, 22 executions".into())
}

async fn binary_types(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(
        &c,
        "types",
        "id int PRIMARY KEY, b bool, i2 int2, i8 int8, f4 float4, f8 float8, t text, \
         by bytea, ts timestamptz, j jsonb, ia int4[], ta text[], n int4",
    )
    .await?;
    let bytes: Vec<u8> = (0..=255).collect();
    let ts = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let json = serde_json::json!({"a": [1, 2.5, {"b": null}], "s": "é✓"});
    let ints: Vec<i32> = vec![i32::MIN, 0, i32::MAX];
    let texts: Vec<String> = vec!["a,b".into(), "\"q\"".into(), String::new()];
    let text = "héllo ✓ \u{1F600} 'quoted' \\ backslash";
    let none: Option<i32> = None;
    c.execute(
        "INSERT INTO compat_tokio_postgres_types VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &[
            &1i32, &true, &i16::MIN, &i64::MAX, &1.5f32, &-2.25e300f64, &text, &bytes, &ts,
            &json, &ints, &texts, &none,
        ],
    )
    .await
    .ctx("insert with binary parameters")?;
    let row = c
        .query_one(
            "SELECT b, i2, i8, f4, f8, t, by, ts, j, ia, ta, n FROM compat_tokio_postgres_types WHERE id = $1",
            &[&1i32],
        )
        .await
        .ctx("select")?;
    let back = (
        row.get::<_, bool>(0),
        row.get::<_, i16>(1),
        row.get::<_, i64>(2),
        row.get::<_, f32>(3),
        row.get::<_, f64>(4),
        row.get::<_, String>(5),
        row.get::<_, Vec<u8>>(6),
        row.get::<_, SystemTime>(7),
        row.get::<_, serde_json::Value>(8),
        row.get::<_, Vec<i32>>(9),
        row.get::<_, Vec<String>>(10),
        row.get::<_, Option<i32>>(11),
    );
    let sent = (
        true,
        i16::MIN,
        i64::MAX,
        1.5f32,
        -2.25e300f64,
        text.to_string(),
        bytes,
        ts,
        json,
        ints,
        texts,
        none,
    );
    ensure(back == sent, || {
        format!("sent {sent:?}, read back {back:?}")
    })?;
    // Binary results of expressions, too.
    let row = c
        .query_one(
            "SELECT $1::int8 * 2, $2::float8 / 4, $3::bytea || '\\x00'::bytea",
            &[&21i64, &1.0f64, &vec![7u8]],
        )
        .await
        .ctx("expressions")?;
    let got = (
        row.get::<_, i64>(0),
        row.get::<_, f64>(1),
        row.get::<_, Vec<u8>>(2),
    );
    ensure(got == (42, 0.25, vec![7, 0]), || {
        format!("expressions: {got:?}")
    })?;
    Ok("bool, int2/4/8, float4/8, text, bytea, timestamptz, jsonb, arrays, NULL round-trip".into())
}

/// `fut` within 10 s, its error or time-out as a failure naming `what`.
async fn within<T>(
    what: &str,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("{what}: no answer within 10 s"))?
        .ctx(what)
}

async fn copy_in_out(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "copy", "id int PRIMARY KEY, v text").await?;
    let mut data = String::new();
    for id in 1..=1000 {
        if id % 100 == 0 {
            data.push_str(&format!("{id}\t\\N\n"));
        } else {
            data.push_str(&format!("{id}\tline {id}\\twith tab and \\\\ backslash\n"));
        }
    }
    let sink = within(
        "COPY FROM STDIN (extended protocol)",
        c.copy_in("COPY compat_tokio_postgres_copy (id, v) FROM STDIN"),
    )
    .await?;
    pin_mut!(sink);
    // In several chunks, split mid-row.
    for chunk in data.as_bytes().chunks(7000) {
        within("COPY data", sink.send(bytes::Bytes::copy_from_slice(chunk))).await?;
    }
    let n = within("CopyDone and Sync", sink.as_mut().finish()).await?;
    ensure(n == 1000, || format!("COPY FROM reported {n} rows"))?;
    let stream = within(
        "COPY TO STDOUT (extended protocol)",
        c.copy_out("COPY (SELECT id, v FROM compat_tokio_postgres_copy ORDER BY id) TO STDOUT"),
    )
    .await?;
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .map_err(|_| "COPY TO data: nothing within 10 s".to_string())?
    {
        out.extend_from_slice(&chunk.ctx("COPY TO data")?);
    }
    ensure(out == data.as_bytes(), || {
        format!(
            "COPY TO returned {} bytes, COPY FROM sent {}",
            out.len(),
            data.len()
        )
    })?;
    let nulls: i64 = c
        .query_one(
            "SELECT count(*) FROM compat_tokio_postgres_copy WHERE v IS NULL",
            &[],
        )
        .await
        .ctx("count NULLs")?
        .get(0);
    ensure(nulls == 10, || format!("{nulls} NULLs"))?;
    Ok("1000 rows in, the same bytes out".into())
}

async fn pipelining(t: &Target) -> Check {
    let c = connect(t).await?;
    fresh_table(&c, "pipe", "id int PRIMARY KEY").await?;
    // Reads only: ten statements in flight at once, answers in order.
    let echo = c.prepare("SELECT $1::int4 + 1").await.ctx("prepare")?;
    let answers = join_all((0..10i32).map(|i| {
        let c = &c;
        let echo = &echo;
        async move { c.query_one(echo, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
    }))
    .await;
    let answers: Result<Vec<i32>, _> = answers.into_iter().collect();
    let answers = answers.ctx("pipelined reads")?;
    ensure(answers == (1..=10).collect::<Vec<_>>(), || {
        format!("pipelined answers {answers:?}")
    })?;
    // Writes and reads in flight together: each read sees the writes
    // sent before it, as on one PostgreSQL connection.
    let insert = c
        .prepare("INSERT INTO compat_tokio_postgres_pipe VALUES ($1)")
        .await
        .ctx("prepare insert")?;
    let count = c
        .prepare("SELECT count(*) FROM compat_tokio_postgres_pipe")
        .await
        .ctx("prepare count")?;
    let (i1, n1, i2, i3, n2) = tokio::join!(
        c.execute(&insert, &[&1]),
        c.query_one(&count, &[]),
        c.execute(&insert, &[&2]),
        c.execute(&insert, &[&3]),
        c.query_one(&count, &[]),
    );
    i1.ctx("insert 1")?;
    i2.ctx("insert 2")?;
    i3.ctx("insert 3")?;
    let n1: i64 = n1.ctx("count after insert 1")?.get(0);
    let n2: i64 = n2.ctx("count after insert 3")?.get(0);
    ensure((n1, n2) == (1, 3), || {
        format!("pipelined counts after 1 and 3 inserts: {n1} and {n2}")
    })?;
    Ok("10 reads in flight; inserts and counts in flight see each other in order".into())
}

async fn transactions(t: &Target) -> Check {
    let mut c = connect(t).await?;
    fresh_table(&c, "txapi", "id int PRIMARY KEY").await?;
    let insert = "INSERT INTO compat_tokio_postgres_txapi VALUES ($1)";
    let tx = c.transaction().await.ctx("transaction")?;
    tx.execute(insert, &[&1]).await.ctx("insert 1")?;
    tx.commit().await.ctx("commit")?;

    let tx = c.transaction().await.ctx("transaction")?;
    tx.execute(insert, &[&2]).await.ctx("insert 2")?;
    drop(tx); // rolls back

    let mut tx = c.transaction().await.ctx("transaction")?;
    tx.execute(insert, &[&3]).await.ctx("insert 3")?;
    let sp = tx.savepoint("sp1").await.ctx("savepoint")?;
    sp.execute(insert, &[&4]).await.ctx("insert 4")?;
    sp.rollback().await.ctx("rollback to savepoint")?;
    let sp = tx.savepoint("sp2").await.ctx("savepoint")?;
    sp.execute(insert, &[&5]).await.ctx("insert 5")?;
    sp.commit().await.ctx("release savepoint")?;
    tx.commit().await.ctx("commit")?;

    let tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .ctx("repeatable read transaction")?;
    tx.execute(insert, &[&6]).await.ctx("insert 6")?;
    tx.commit().await.ctx("commit")?;

    let tx = c
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .ctx("read-only transaction")?;
    let rows = tx
        .query(
            "SELECT id FROM compat_tokio_postgres_txapi ORDER BY id",
            &[],
        )
        .await
        .ctx("read in the read-only transaction")?;
    let seen: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let e = tx.execute(insert, &[&7]).await.err();
    let code = e.as_ref().and_then(|e| e.code()).cloned();
    tx.rollback().await.ctx("rollback")?;
    ensure(seen == [1, 3, 5, 6], || {
        format!("read-only transaction saw {seen:?}")
    })?;
    ensure(code == Some(SqlState::READ_ONLY_SQL_TRANSACTION), || {
        format!(
            "insert in a read-only transaction: {:?}",
            e.map(|e| describe(&e))
        )
    })?;
    let got = ids(&c, "compat_tokio_postgres_txapi").await?;
    ensure(got == [1, 3, 5, 6], || format!("rows: {got:?}"))?;
    Ok("commit, rollback on drop, savepoints, repeatable read, read only (25006)".into())
}
