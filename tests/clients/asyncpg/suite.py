"""Driver compatibility suite for asyncpg (see ../README.md for the contract).

One JSON line per feature on stdout; everything else on stderr.
"""

import asyncio
import datetime
import io
import json
import os
import sys
import time
import traceback
import uuid
import zoneinfo
from decimal import Decimal

import asyncpg
from asyncpg import exceptions as exc

DRIVER = "asyncpg"
APP = f"compat-{DRIVER}"
T = f"compat_{DRIVER}"
FEATURE_TIMEOUT = 15  # seconds, per feature


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def report(feature, ok, detail=""):
    print(json.dumps({"feature": feature, "ok": bool(ok), "detail": str(detail)[:300]}), flush=True)


def conn_args():
    return dict(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=int(os.environ.get("PGPORT", "5432")),
        user=os.environ.get("PGUSER", "postgres"),
        database=os.environ.get("PGDATABASE", "postgres"),
        server_settings={"application_name": APP},
        timeout=5,
        command_timeout=10,
        ssl=False,
    )


async def connect():
    return await asyncpg.connect(**conn_args())


class Fail(Exception):
    """An assertion of the suite failed (the detail says which)."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


# Tables the current feature wrote. After the feature, every copy must agree: a read
# in a transaction (which Reprise runs on the primary) and autocommit reads (which it
# spreads over the subscribers) must give the same summary of each table. A fresh
# connection is used (no read-your-writes pinning); a subscriber may lag a little,
# so the comparison is retried until REPLICATION_WAIT_S.
TABLES = []
SUMMARY = "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t"
REPLICATION_WAIT_S = 5.0


def replicated(table):
    TABLES.append(table)


async def verify_replication():
    """None if every copy of the tables agrees, else a short description."""
    if not TABLES:
        return None
    deadline = time.monotonic() + REPLICATION_WAIT_S
    async with Conn() as conn:
        while True:
            problem = None
            for t in TABLES:
                q = SUMMARY.format(t)
                async with conn.transaction():
                    primary = tuple(await conn.fetchrow(q))
                for _ in range(4):
                    try:
                        other = tuple(await conn.fetchrow(q))
                    except asyncpg.exceptions.UndefinedTableError:
                        # A copy that has not applied the CREATE TABLE yet.
                        other = (None,)
                    if other != primary:
                        problem = f"{t}: an autocommit read (count {other[0]}) differs from the primary (count {primary[0]})"
                        break
                if problem:
                    break
            if problem is None or time.monotonic() > deadline:
                return problem
            await asyncio.sleep(0.1)


async def reset_table(conn, name, cols):
    await conn.execute(f"DROP TABLE IF EXISTS {name}")
    await conn.execute(f"CREATE TABLE {name} ({cols})")


class Conn:
    """async with Conn() as c: a connection closed (or terminated) at exit."""

    async def __aenter__(self):
        self.c = await connect()
        return self.c

    async def __aexit__(self, *a):
        try:
            await asyncio.wait_for(self.c.close(), 3)
        except BaseException:  # noqa: BLE001
            self.c.terminate()


# ---------------------------------------------------------------- common


async def f_routing():
    async with Conn() as conn:
        reads, writes = f"{T}_reads", f"{T}_writes"
        await reset_table(conn, reads, "id int primary key, v text")
        await reset_table(conn, writes, "id int primary key, v text")
        await conn.executemany(f"INSERT INTO {reads} (id, v) VALUES ($1, $2)", [(i, f"r{i}") for i in range(1, 11)])
        await asyncio.sleep(1)
        # every read and write runs even if one is wrong: the harness counts them on the nodes
        wrong = []
        for k in range(20):
            i = k % 10 + 1
            v = await conn.fetchval(f"SELECT v FROM {reads} WHERE id = $1", i)
            if v != f"r{i}":
                wrong.append(f"read {k}: id {i} gave {v!r}")
        for i in range(1, 6):
            status = await conn.execute(f"INSERT INTO {writes} (id, v) VALUES ($1, $2)", i, f"w{i}")
            if status != "INSERT 0 1":
                wrong.append(f"insert {i}: {status}")
        check(not wrong, f"{len(wrong)} wrong: " + "; ".join(wrong[:3]))
    return "20 reads, 5 writes"


async def f_read_own_write():
    async with Conn() as conn:
        t = f"{T}_row"
        replicated(t)
        await reset_table(conn, t, "id int primary key, v text")
        for i in range(1, 11):
            await conn.execute(f"INSERT INTO {t} (id, v) VALUES ($1, $2)", i, f"x{i}")
            v = await conn.fetchval(f"SELECT v FROM {t} WHERE id = $1", i)
            check(v == f"x{i}", f"row {i} not seen right after insert: {v!r}")
        # simple-protocol insert followed by a simple-protocol read
        await conn.execute(f"INSERT INTO {t} VALUES (11, 'x11')")
        rows = await conn.fetch(f"SELECT v FROM {t} WHERE id = 11")
        check([r["v"] for r in rows] == ["x11"], f"simple-protocol read {rows}")
    return "11 insert-then-select pairs"


async def f_error_recovery():
    async with Conn() as conn:
        t = f"{T}_err"
        replicated(t)
        await reset_table(conn, t, "id int primary key")
        # extended protocol (fetch prepares the statement)
        try:
            await conn.fetch(f"SELECT * FROM {T}_missing_table")
            raise Fail("select from a missing table succeeded")
        except exc.UndefinedTableError as e:
            check(e.sqlstate == "42P01", f"sqlstate {e.sqlstate}")
        check(await conn.fetchval("SELECT 1") == 1, "statement after error")
        # simple protocol
        try:
            await conn.execute(f"SELECT * FROM {T}_missing_table")
            raise Fail("simple select from a missing table succeeded")
        except exc.UndefinedTableError:
            pass
        await conn.execute(f"INSERT INTO {t} VALUES (1)")
        # inside a transaction
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {t} VALUES ($1)", 2)
        try:
            await conn.fetch(f"SELECT * FROM {T}_missing_table WHERE x = $1", 1)
            raise Fail("select from a missing table succeeded in a transaction")
        except exc.UndefinedTableError as e:
            check(e.sqlstate == "42P01", f"sqlstate in transaction {e.sqlstate}")
        try:
            await conn.fetchval("SELECT 1")
            raise Fail("statement in an aborted transaction succeeded")
        except exc.InFailedSQLTransactionError:
            pass
        await conn.execute("ROLLBACK")
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {t} VALUES ($1)", 3)
        await conn.execute("COMMIT")
        ids = [r["id"] for r in await conn.fetch(f"SELECT id FROM {t} ORDER BY id")]
        check(ids == [1, 3], f"rows {ids}")
        # a unique violation from a write, then a write works
        try:
            await conn.execute(f"INSERT INTO {t} VALUES ($1)", 3)
            raise Fail("duplicate key accepted")
        except exc.UniqueViolationError as e:
            check(e.sqlstate == "23505", f"sqlstate {e.sqlstate}")
        await conn.execute(f"INSERT INTO {t} VALUES ($1)", 4)
        check(await conn.fetchval(f"SELECT count(*) FROM {t}") == 3, "count")
    return "42P01 and 23505 reported; autocommit and transaction recover"


async def f_cancel():
    async with Conn() as conn:
        t0 = time.monotonic()
        outcome = None
        try:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10)"), timeout=0.5)
            raise Fail("pg_sleep(10) was not cancelled")
        except exc.QueryCanceledError as e:
            outcome = f"QueryCanceledError {e.sqlstate}"
        except asyncio.TimeoutError:
            outcome = "TimeoutError"
        # the next statement waits for the cancelled one to end: quick only if the
        # CancelRequest reached the backend running pg_sleep
        v = await asyncio.wait_for(conn.fetchval("SELECT 42"), timeout=8)
        took = time.monotonic() - t0
        check(v == 42, f"after cancel got {v}")
        check(took < 4, f"cancel not effective: next statement answered after {took:.1f} s")
        # the same inside a transaction: the transaction is aborted by the cancel
        tr = conn.transaction()
        await tr.start()
        t1 = time.monotonic()
        try:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10)"), timeout=0.5)
            raise Fail("pg_sleep(10) in a transaction was not cancelled")
        except (exc.QueryCanceledError, asyncio.TimeoutError):
            pass
        await asyncio.wait_for(tr.rollback(), timeout=8)
        took2 = time.monotonic() - t1
        check(took2 < 4, f"cancel in a transaction not effective ({took2:.1f} s)")
        check(await conn.fetchval("SELECT $1::int", 43) == 43, "not usable after cancel in a transaction")
        # also a server-side statement_timeout: 57014 as an exception
        try:
            await conn.execute("SET statement_timeout = 300")
            await conn.fetchval("SELECT pg_sleep(10)")
            raise Fail("statement_timeout did not fire")
        except exc.QueryCanceledError as e:
            check(e.sqlstate == "57014", f"sqlstate {e.sqlstate}")
        finally:
            await conn.execute("RESET statement_timeout")
        check(await conn.fetchval("SELECT 44") == 44, "not usable after statement_timeout")
    return f"{outcome}; usable after {took:.2f} s"


async def f_transaction():
    async with Conn() as conn:
        t = f"{T}_tx"
        replicated(t)
        await reset_table(conn, t, "id int primary key, v text")
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1, "a")
        await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 2, "b")
        await conn.execute("COMMIT")
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 3, "c")
        await conn.execute("ROLLBACK")
        rows = [tuple(r) for r in await conn.fetch(f"SELECT id, v FROM {t} ORDER BY id")]
        check(rows == [(1, "a"), (2, "b")], f"rows {rows}")
    return "committed rows only"


# ---------------------------------------------------------------- asyncpg specific


async def f_prepared_statement():
    async with Conn() as conn:
        t = f"{T}_prep"
        replicated(t)
        await reset_table(conn, t, "id int primary key, v text, n int")
        ins = await conn.prepare(f"INSERT INTO {t} (id, v, n) VALUES ($1, $2, $3)")
        for i in range(1, 51):
            await ins.fetch(i, f"v{i}", i * i)
        sel = await conn.prepare(f"SELECT v, n FROM {t} WHERE id = $1")
        check([a.name for a in sel.get_attributes()] == ["v", "n"], "attributes")
        check(len(sel.get_parameters()) == 1, "parameters")
        for k in range(100):
            i = k % 50 + 1
            row = await sel.fetchrow(i)
            check(row is not None and tuple(row) == (f"v{i}", i * i), f"select {i}: {row!r}")
        rng = await conn.prepare(f"SELECT id FROM {t} WHERE id BETWEEN $1 AND $2 ORDER BY id")
        for lo in range(1, 41, 10):
            ids = [r[0] for r in await rng.fetch(lo, lo + 9)]
            check(ids == list(range(lo, lo + 10)), f"range {lo}: {ids}")
        check(await rng.fetchval(5, 6) == 5, "fetchval")
        # a cursor over a prepared statement in a transaction
        async with conn.transaction():
            got = [r[0] async for r in rng.cursor(1, 50, prefetch=7)]
        check(got == list(range(1, 51)), f"cursor got {len(got)} rows")
        # executemany on a prepared statement
        upd = await conn.prepare(f"UPDATE {t} SET n = n + $2 WHERE id = $1")
        await upd.executemany([(i, 1) for i in range(1, 11)])
        check(await conn.fetchval(f"SELECT sum(n) FROM {t}") == sum(i * i for i in range(1, 51)) + 10, "sum after update")
    return "50 inserts, 100 selects, range, cursor, executemany"


async def f_binary_types():
    tz = zoneinfo.ZoneInfo("Asia/Kathmandu")  # UTC+5:45
    async with Conn() as conn:
        t = f"{T}_types"
        replicated(t)
        await reset_table(
            conn,
            t,
            "id int primary key, ia int[], ia2 int[], ta text[], jb jsonb, j json, n numeric, "
            "ts timestamptz, b bytea, u uuid, f8 float8, d date, iv interval",
        )
        rows = []
        for i in range(1, 4):
            rows.append(
                (
                    i,
                    [1, -2, 2147483647, -2147483648, None, i],
                    [[1, 2], [3, 4 + i]],
                    ["a", "b c", "", None, "\u00e9\u00e8 \"q\" {x}", f"t{i}"],
                    json.dumps({"nested": {"deep": [True, False, None]}, "num": 1.5, "i": i, "s": "\u00e9"}),
                    json.dumps({"k": [1, 2, {"x": None}], "i": i}),
                    Decimal("-12345678901234567890123456789.123456789012345678901234567890") + i,
                    datetime.datetime(2024, 3, 10, 1, 59, 59, 123456 + i, tzinfo=tz),
                    bytes(range(256)) + bytes([i]),
                    uuid.uuid4(),
                    1.0 / 3.0 + i,
                    datetime.date(1999, 12, 31) + datetime.timedelta(days=i),
                    datetime.timedelta(days=i, seconds=3723, microseconds=5),
                )
            )
        await conn.executemany(f"INSERT INTO {t} VALUES ({', '.join(f'${k}' for k in range(1, 14))})", rows)
        got = await conn.fetch(f"SELECT * FROM {t} ORDER BY id")
        check(len(got) == 3, f"{len(got)} rows")
        names = ["id", "ia", "ia2", "ta", "jb", "j", "n", "ts", "b", "u", "f8", "d", "iv"]
        for r, g in zip(rows, got):
            for name, e, a in zip(names, r, g):
                if name in ("jb", "j"):
                    e, a = json.loads(e), json.loads(a)
                check(e == a, f"row {r[0]} {name}: sent {e!r} got {a!r}")
        # lookups by binary parameters of every kind (read path)
        ids = await conn.fetch(
            f"SELECT id FROM {t} WHERE u = $1 AND b = $2 AND n = $3 AND ts = $4 AND ia = $5 AND jb = $6::jsonb",
            rows[1][9], rows[1][8], rows[1][6], rows[1][7], rows[1][1], rows[1][4],
        )
        check([r[0] for r in ids] == [2], f"lookup by binary params {ids}")
        # a jsonb codec round trip (python objects in and out)
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        obj = {"a": [1, 2, 3], "b": {"c": None}}
        await conn.execute(f"UPDATE {t} SET jb = $1 WHERE id = $2", obj, 3)
        check(await conn.fetchval(f"SELECT jb FROM {t} WHERE id = $1", 3) == obj, "jsonb codec round trip")
    return "int[], text[], jsonb, json, numeric, timestamptz, bytea(256), uuid, float8, date, interval"


async def f_copy_records_to_table():
    async with Conn() as conn:
        t = f"{T}_copy"
        replicated(t)
        await reset_table(conn, t, "id int primary key, v text, n numeric, b bytea, u uuid, ts timestamptz")
        base = datetime.datetime(2023, 1, 1, tzinfo=datetime.timezone.utc)
        records = [
            (i, f"rec {i}\t\n\\", Decimal(i) / 8, bytes([i % 256, 0]), uuid.uuid4(), base + datetime.timedelta(seconds=i))
            for i in range(1, 1001)
        ]
        status = await conn.copy_records_to_table(t, records=records, columns=["id", "v", "n", "b", "u", "ts"])
        check(status == "COPY 1000", f"status {status}")
        row = await conn.fetchrow(f"SELECT count(*), sum(id), sum(n) FROM {t}")
        check(tuple(row) == (1000, 500500, Decimal(500500) / 8), f"count/sums {tuple(row)}")
        back = [tuple(r) for r in await conn.fetch(f"SELECT id, v, n, b, u, ts FROM {t} ORDER BY id")]
        check(back == records, "records read back differ")
        # copy_to_table from a text source and copy_from_query out
        data = "".join(f"{i}\tsrc {i}\t{i}\t\\\\x00\t{uuid.uuid4()}\t2023-01-01 00:00:00+00\n" for i in range(1001, 1011))
        status = await conn.copy_to_table(t, source=io.BytesIO(data.encode()))
        check(status == "COPY 10", f"copy_to_table status {status}")
        out = io.BytesIO()
        status = await conn.copy_from_query(f"SELECT id FROM {t} WHERE id > $1 ORDER BY id", 1000, output=out)
        check(status == "COPY 10", f"copy_from_query status {status}")
        check(out.getvalue().decode().split() == [str(i) for i in range(1001, 1011)], "copy out content")
    return "1000 records (binary COPY), 10 text rows, COPY out"


async def f_transactions():
    async with Conn() as conn:
        t = f"{T}_txs"
        replicated(t)
        await reset_table(conn, t, "id int primary key, v text")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1, "committed")
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 2, "committed")

        class Boom(Exception):
            pass

        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 3, "rolled back")
                raise Boom()
        except Boom:
            pass
        check(not conn.is_in_transaction(), "still in a transaction after rollback")
        # nested: the savepoint rolls back, the outer commits
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 4, "outer")
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 5, "inner rolled back")
                    raise Boom()
            except Boom:
                pass
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 6, "inner committed")
            # an error inside a savepoint, recovered by the savepoint
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 4, "duplicate")
            except exc.UniqueViolationError:
                pass
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 7, "after savepoint error")
        # isolation levels and read only
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 8, "repeatable read")
        async with conn.transaction(readonly=True):
            n = await conn.fetchval(f"SELECT count(*) FROM {t}")
        check(n == 6, f"count in read-only transaction {n}")
        async with conn.transaction(isolation="serializable"):
            await conn.execute(f"UPDATE {t} SET v = v || '!' WHERE id = $1", 8)
        rows = [r["id"] for r in await conn.fetch(f"SELECT id FROM {t} ORDER BY id")]
        check(rows == [1, 2, 4, 6, 7, 8], f"rows {rows}")
    return "commit, rollback on exception, savepoints, isolation levels, read only"


async def f_many_connections():
    t = f"{T}_many"
    replicated(t)
    n = 30
    async with Conn() as conn:
        await reset_table(conn, t, "id int primary key, worker int, v text")
        await conn.execute(f"INSERT INTO {t} VALUES (0, 0, 'seed')")
    # fresh sessions read rows other sessions wrote: give the subscribers time to apply
    await asyncio.sleep(1)

    # a pool of 30, every connection busy at once: a read, a write, a read of that write
    pool = await asyncpg.create_pool(min_size=n, max_size=n, **conn_args())
    try:
        async def worker(k):
            async with pool.acquire() as c:
                seed = await c.fetchval(f"SELECT v FROM {t} WHERE id = $1", 0)
                await c.execute(f"INSERT INTO {t} VALUES ($1, $2, $3)", k, k, f"w{k}")
                v = await c.fetchval(f"SELECT v FROM {t} WHERE id = $1", k)
                return seed, v

        results = await asyncio.gather(*(worker(k) for k in range(1, n + 1)), return_exceptions=True)
    finally:
        await asyncio.wait_for(pool.close(), 5)
    errs = [r for r in results if isinstance(r, BaseException)]
    check(not errs, f"{len(errs)} pooled workers failed, first: {errs[0]!r}" if errs else "")
    bad = [(k, r) for k, r in zip(range(1, n + 1), results) if r != ("seed", f"w{k}")]
    check(not bad, f"{len(bad)} of {n} workers read back wrong values (worker, (seed, own row)): {bad[:3]}")
    await asyncio.sleep(1)

    # 30 plain connections at once, each a read then a write
    opened = await asyncio.gather(*(connect() for _ in range(n)), return_exceptions=True)
    conns = [c for c in opened if not isinstance(c, BaseException)]
    try:
        failed = [c for c in opened if isinstance(c, BaseException)]
        check(not failed, f"{len(failed)} of {n} connections failed to open, first: {failed[0]!r}" if failed else "")

        async def read_write(k, c):
            r = await c.fetchval(f"SELECT count(*) FROM {t} WHERE id <= $1", n)
            w = await c.execute(f"UPDATE {t} SET v = $2 WHERE id = $1", k, f"u{k}")
            return r, w

        out = await asyncio.gather(*(read_write(k, c) for k, c in zip(range(1, n + 1), conns)), return_exceptions=True)
        bad = [(k, o) for k, o in zip(range(1, n + 1), out) if o != (n + 1, "UPDATE 1")]
        check(not bad, f"{len(bad)} of {n} connections got wrong results (conn, (count, tag)): {bad[:3]}")
    finally:
        await asyncio.gather(*(asyncio.wait_for(c.close(), 3) for c in conns), return_exceptions=True)
    async with Conn() as conn:
        async with conn.transaction():
            cnt = await conn.fetchval(f"SELECT count(*) FROM {t} WHERE v LIKE 'u%'")
    check(cnt == n, f"updated rows {cnt}")
    return f"pool of {n} and {n} plain connections, all busy at once"


FEATURES = [
    ("routing", f_routing),
    ("read_own_write", f_read_own_write),
    ("error_recovery", f_error_recovery),
    ("cancel", f_cancel),
    ("transaction", f_transaction),
    ("prepared_statement", f_prepared_statement),
    ("binary_types", f_binary_types),
    ("copy_records_to_table", f_copy_records_to_table),
    ("many_connections", f_many_connections),
    # last: through Reprise its savepoint error currently stops the subscribers'
    # appliers (see the report), and no later feature could see its copies then
    ("transactions", f_transactions),
]


async def main():
    log(f"asyncpg {asyncpg.__version__}, mode {os.environ.get('COMPAT_MODE')}")
    only = set(sys.argv[1:])  # optional: run only the named features
    for name, fn in FEATURES:
        if only and name not in only:
            continue
        TABLES.clear()
        t0 = time.monotonic()
        try:
            detail = await asyncio.wait_for(fn(), FEATURE_TIMEOUT)
            problem = await asyncio.wait_for(verify_replication(), REPLICATION_WAIT_S + 5)
            if problem:
                report(name, False, f"copies differ after the feature ran: {problem}")
            else:
                report(name, True, f"{detail} ({time.monotonic() - t0:.2f} s)")
        except asyncio.TimeoutError:
            log(f"--- {name} timed out:\n{traceback.format_exc()}")
            report(name, False, f"timed out after {FEATURE_TIMEOUT} s")
        except Exception as e:  # noqa: BLE001 - every failure becomes a report line
            log(f"--- {name} failed:\n{traceback.format_exc()}")
            state = getattr(e, "sqlstate", None)
            report(name, False, f"{type(e).__name__}{' ' + state if state else ''}: {e}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
