"""Driver compatibility suite for psycopg 3 (see ../README.md for the contract).

One JSON line per feature on stdout; everything else on stderr.
"""

import datetime
import json
import os
import signal
import sys
import threading
import time
import traceback
import uuid
import zoneinfo
from decimal import Decimal

import psycopg
from psycopg import errors, sql
from psycopg.types.json import Json, Jsonb

DRIVER = "psycopg"
APP = f"compat-{DRIVER}"
T = f"compat_{DRIVER}"
FEATURE_TIMEOUT = 15  # seconds, per feature


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def report(feature, ok, detail=""):
    print(json.dumps({"feature": feature, "ok": bool(ok), "detail": str(detail)[:300]}), flush=True)


def connect(autocommit=True):
    return psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        dbname=os.environ.get("PGDATABASE", "postgres"),
        application_name=APP,
        connect_timeout=5,
        autocommit=autocommit,
    )


class FeatureTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise FeatureTimeout(f"feature took longer than {FEATURE_TIMEOUT} s")


class Fail(Exception):
    """An assertion of the suite failed (the detail says which)."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def sqlstate_of(e):
    return getattr(e, "sqlstate", None)


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


def verify_replication():
    """None if every copy of the tables agrees, else a short description."""
    if not TABLES:
        return None
    deadline = time.monotonic() + REPLICATION_WAIT_S
    with connect() as conn:
        while True:
            problem = None
            for t in TABLES:
                q = SUMMARY.format(t)
                with conn.transaction():
                    primary = conn.execute(q).fetchone()
                for _ in range(4):
                    try:
                        other = conn.execute(q).fetchone()
                    except psycopg.errors.UndefinedTable:
                        # A copy that has not applied the CREATE TABLE yet.
                        other = (None,)
                    if other != primary:
                        problem = f"{t}: an autocommit read (count {other[0]}) differs from the primary (count {primary[0]})"
                        break
                if problem:
                    break
            if problem is None or time.monotonic() > deadline:
                return problem
            time.sleep(0.1)


def reset_table(conn, name, cols):
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} ({cols})")


# ---------------------------------------------------------------- common


def f_routing():
    with connect() as conn:
        reads, writes = f"{T}_reads", f"{T}_writes"
        reset_table(conn, reads, "id int primary key, v text")
        reset_table(conn, writes, "id int primary key, v text")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {reads} (id, v) VALUES (%s, %s)", [(i, f"r{i}") for i in range(1, 11)])
        time.sleep(1)
        # every read and write runs even if one is wrong: the harness counts them on the nodes
        wrong = []
        for k in range(20):
            i = k % 10 + 1
            row = conn.execute(f"SELECT v FROM {reads} WHERE id = %s", (i,)).fetchone()
            if row != (f"r{i}",):
                wrong.append(f"read {k}: id {i} gave {row!r}")
        for i in range(1, 6):
            cur = conn.execute(f"INSERT INTO {writes} (id, v) VALUES (%s, %s)", (i, f"w{i}"))
            if cur.rowcount != 1:
                wrong.append(f"insert {i}: rowcount {cur.rowcount}")
        check(not wrong, f"{len(wrong)} wrong: " + "; ".join(wrong[:3]))
    return "20 reads, 5 writes"


def f_read_own_write():
    with connect() as conn:
        t = f"{T}_row"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text")
        n = 0
        for i in range(1, 11):
            conn.execute(f"INSERT INTO {t} (id, v) VALUES (%s, %s)", (i, f"x{i}"))
            row = conn.execute(f"SELECT v FROM {t} WHERE id = %s", (i,)).fetchone()
            check(row == (f"x{i}",), f"row {i} not seen right after insert: {row!r}")
            n += 1
    return f"{n} insert-then-select pairs"


def f_error_recovery():
    with connect() as conn:
        t = f"{T}_err"
        replicated(t)
        reset_table(conn, t, "id int primary key")
        # autocommit
        try:
            conn.execute(f"SELECT * FROM {T}_missing_table")
            raise Fail("select from a missing table succeeded")
        except errors.UndefinedTable as e:
            check(e.sqlstate == "42P01", f"sqlstate {e.sqlstate}")
        check(conn.execute("SELECT 1").fetchone() == (1,), "statement after error")
        conn.execute(f"INSERT INTO {t} VALUES (1)")
        # error with parameters (extended protocol)
        try:
            conn.execute(f"SELECT * FROM {T}_missing_table WHERE x = %s", (1,))
            raise Fail("parameterised select from a missing table succeeded")
        except errors.UndefinedTable:
            pass
        check(conn.execute("SELECT %s::int", (7,)).fetchone() == (7,), "parameterised statement after error")
        # inside a transaction
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {t} VALUES (2)")
        try:
            conn.execute(f"SELECT * FROM {T}_missing_table")
            raise Fail("select from a missing table succeeded in a transaction")
        except errors.UndefinedTable as e:
            check(e.sqlstate == "42P01", f"sqlstate in transaction {e.sqlstate}")
        try:
            conn.execute("SELECT 1")
            raise Fail("statement in an aborted transaction succeeded")
        except errors.InFailedSqlTransaction:
            pass
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {t} VALUES (3)")
        conn.execute("COMMIT")
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {t} ORDER BY id")]
        check(ids == [1, 3], f"rows {ids}")
        # the same with psycopg's own transaction handling (autocommit off)
    with connect(autocommit=False) as conn:
        try:
            conn.execute(f"SELECT * FROM {T}_missing_table")
            raise Fail("missing table ok (non-autocommit)")
        except errors.UndefinedTable:
            conn.rollback()
        conn.execute(f"INSERT INTO {t} VALUES (4)")
        conn.commit()
        check(conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (3,), "count after non-autocommit recovery")
        conn.rollback()
    return "42P01 reported; autocommit and transaction recover"


def f_cancel():
    with connect() as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        t0 = time.monotonic()
        timer.start()
        try:
            conn.execute("SELECT pg_sleep(10)")
            raise Fail("pg_sleep(10) was not cancelled")
        except errors.QueryCanceled as e:
            check(e.sqlstate == "57014", f"sqlstate {e.sqlstate}")
        finally:
            timer.cancel()
        took = time.monotonic() - t0
        check(took < 5, f"cancel took {took:.1f} s")
        check(conn.execute("SELECT 42").fetchone() == (42,), "connection not usable after cancel")
        # also in a transaction: cancelled, then ROLLBACK, and the connection still works
        conn.execute("BEGIN")
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            conn.execute("SELECT pg_sleep(10)")
            raise Fail("pg_sleep(10) in a transaction was not cancelled")
        except errors.QueryCanceled:
            pass
        finally:
            timer.cancel()
        conn.execute("ROLLBACK")
        check(conn.execute("SELECT %s::int", (43,)).fetchone() == (43,), "not usable after cancel in a transaction")
    return f"57014 after {took:.2f} s; usable after"


def f_transaction():
    with connect() as conn:
        t = f"{T}_tx"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text")
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (1, "a"))
        conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (2, "b"))
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (3, "c"))
        conn.execute("ROLLBACK")
        # psycopg's transaction() block: commit and rollback
        with conn.transaction():
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (4, "d"))
        with conn.transaction():
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (5, "e"))
            raise psycopg.Rollback()
        rows = conn.execute(f"SELECT id, v FROM {t} ORDER BY id").fetchall()
        check(rows == [(1, "a"), (2, "b"), (4, "d")], f"rows {rows}")
    return "committed rows only"


# ---------------------------------------------------------------- psycopg specific


def f_simple_query():
    with connect() as conn:
        t = f"{T}_simple"
        replicated(t)
        cur = conn.cursor()
        cur.execute(
            f"DROP TABLE IF EXISTS {t}; "
            f"CREATE TABLE {t} (id int primary key, v text); "
            f"INSERT INTO {t} VALUES (1, 'one'), (2, 'two'); "
            f"INSERT INTO {t} VALUES (3, 'three'); "
            f"UPDATE {t} SET v = upper(v) WHERE id = 2; "
            f"SELECT id, v FROM {t} ORDER BY id"
        )
        # psycopg keeps every result of a multi-statement string; the cursor is on the first
        results = [cur.statusmessage]
        while cur.nextset():
            results.append(cur.statusmessage)
        check(results[-1] == "SELECT 3", f"results {results}")
        rows = cur.fetchall()
        check(rows == [(1, "one"), (2, "TWO"), (3, "three")], f"rows {rows}")
        # a multi-statement read only string (autocommit)
        cur.execute(f"SELECT count(*) FROM {t}; SELECT max(id) FROM {t}")
        first = cur.fetchone()
        check(cur.nextset(), "no second result")
        second = cur.fetchone()
        check(first == (3,) and second == (3,), f"read-only results {first} {second}")
    return f"statuses {results}"


def f_extended_query():
    with connect() as conn:
        t = f"{T}_ext"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text, n numeric")
        for i in range(1, 21):
            cur = conn.execute(f"INSERT INTO {t} (id, v, n) VALUES (%s, %s, %s)", (i, f"v{i}", Decimal(i) / 4), prepare=True)
            check(cur.rowcount == 1, f"insert {i} rowcount {cur.rowcount}")
        for i in range(1, 21):
            row = conn.execute(f"SELECT v, n FROM {t} WHERE id = %s", (i,), prepare=True).fetchone()
            check(row == (f"v{i}", Decimal(i) / 4), f"select {i}: {row!r}")
        cur = conn.execute(f"UPDATE {t} SET v = v || %s WHERE id <= %s", ("!", 5), prepare=True)
        check(cur.rowcount == 5, f"update rowcount {cur.rowcount}")
        # executemany goes through the prepared path too
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t} (id, v, n) VALUES (%s, %s, %s)", [(i, f"m{i}", i) for i in range(21, 31)])
        rows = conn.execute(f"SELECT count(*), sum(id) FROM {t} WHERE v LIKE %s OR id > %s", ("%!", 20), prepare=True).fetchone()
        check(rows == (15, 15 + sum(range(21, 31))), f"aggregate {rows}")
        # inside a transaction as well
        with conn.transaction():
            conn.execute(f"DELETE FROM {t} WHERE id = %s", (30,), prepare=True)
            row = conn.execute(f"SELECT count(*) FROM {t}", prepare=True).fetchone()
            check(row == (29,), f"count in transaction {row}")
    return "prepared inserts/selects/updates"


def f_server_side_cursor():
    with connect() as conn:
        t = f"{T}_ssc"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text")
        conn.execute(f"INSERT INTO {t} SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        n, total, ok_order = 0, 0, True
        with conn.transaction():
            with conn.cursor(name=f"{T}_cur") as cur:
                cur.itersize = 37
                cur.execute(f"SELECT id, v FROM {t} WHERE id > %s ORDER BY id", (0,))
                prev = 0
                for id_, v in cur:
                    n += 1
                    total += id_
                    if id_ != prev + 1 or v != f"row {id_}":
                        ok_order = False
                    prev = id_
        check(n == 1000, f"fetched {n} rows")
        check(ok_order, "rows out of order or wrong")
        check(total == 500500, f"sum {total}")
        # fetchmany in chunks, scroll back
        with conn.transaction():
            with conn.cursor(name=f"{T}_cur2", scrollable=True) as cur:
                cur.execute(f"SELECT id FROM {t} ORDER BY id")
                chunks = 0
                while True:
                    rows = cur.fetchmany(250)
                    if not rows:
                        break
                    chunks += 1
                cur.scroll(0, mode="absolute")
                first = cur.fetchone()
        check(chunks == 4, f"{chunks} chunks of 250")
        check(first == (1,), f"after scroll {first}")
    return "1000 rows in chunks of 37; fetchmany(250) x4; scroll"


def f_copy_in():
    with connect() as conn:
        t = f"{T}_copyin"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text, n numeric, b bytea")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {t} (id, v, n, b) FROM STDIN") as copy:
                for i in range(1, 1001):
                    copy.write_row((i, f"line {i}\ttab\nnewline", Decimal(i) / 8, bytes([i % 256, 0, 255])))
            check(cur.rowcount == 1000, f"copy rowcount {cur.rowcount}")
            # binary COPY too
            with cur.copy(f"COPY {t} (id, v, n, b) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text", "numeric", "bytea"])
                for i in range(1001, 1101):
                    copy.write_row((i, f"bin {i}", Decimal(i) / 8, bytes([i % 256])))
        row = conn.execute(f"SELECT count(*), sum(id), sum(n) FROM {t}").fetchone()
        check(row[0] == 1100 and row[1] == sum(range(1, 1101)), f"count/sum {row}")
        check(row[2] == Decimal(sum(range(1, 1101))) / 8, f"sum(n) {row[2]}")
        v = conn.execute(f"SELECT v, b FROM {t} WHERE id = 7").fetchone()
        check(v == ("line 7\ttab\nnewline", bytes([7, 0, 255])), f"row 7 {v!r}")
    return "1000 text rows + 100 binary rows"


def f_copy_out():
    with connect() as conn:
        t = f"{T}_copyout"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text, n numeric")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t} VALUES (%s, %s, %s)", [(i, f"o{i} \\ \t x", Decimal(i) / 3) for i in range(1, 201)])
        expected = conn.execute(f"SELECT id, v, n::text FROM {t} ORDER BY id").fetchall()
        expected = [(str(a), b, c) for a, b, c in expected]
        got = []
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, v, n FROM {t} ORDER BY id) TO STDOUT") as copy:
                for row in copy.rows():
                    got.append(row)
        check(len(got) == 200, f"{len(got)} rows")
        check(got == expected, f"first mismatch {next(((a, b) for a, b in zip(got, expected) if a != b), None)}")
        # whole-table COPY, raw blocks, binary with types
        raw = bytearray()
        with conn.cursor() as cur:
            with cur.copy(f"COPY {t} TO STDOUT") as copy:
                for block in copy:
                    raw += block
        lines = raw.count(b"\n")
        check(lines == 200, f"raw lines {lines}")
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, n FROM {t} ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "numeric"])
                bin_rows = list(copy.rows())
        db_rows = conn.execute(f"SELECT id, n FROM {t} ORDER BY id").fetchall()
        check(bin_rows == db_rows, f"binary rows differ: {bin_rows[:2]} vs {db_rows[:2]}")
    return "200 rows text/raw/binary match"


def f_pipeline():
    with connect() as conn:
        t = f"{T}_pipe"
        replicated(t)
        reset_table(conn, t, "id int primary key, v text")
        cur = conn.cursor()
        with conn.pipeline():
            for i in range(1, 6):
                conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"p{i}"))
            cur.execute(f"SELECT count(*), string_agg(v, ',' ORDER BY id) FROM {t}")
        counted = cur.fetchone()
        cur.close()
        check(counted == (5, "p1,p2,p3,p4,p5"), f"select in pipeline {counted}")
        # a pipeline inside an explicit transaction, with executemany and an explicit sync
        with conn.transaction():
            cur = conn.cursor()
            with conn.pipeline() as p:
                cur.executemany(f"INSERT INTO {t} VALUES (%s, %s)", [(i, f"q{i}") for i in range(6, 11)])
                p.sync()
                cur.execute(f"UPDATE {t} SET v = v || '!' WHERE id > %s", (8,))
                cur2 = conn.execute(f"SELECT count(*) FROM {t}")
            check(cur.rowcount == 2, f"update rowcount {cur.rowcount}")
            check(cur2.fetchone() == (10,), "count in transaction pipeline")
        # an error in a pipeline aborts the rest until sync; the connection recovers
        try:
            with conn.pipeline():
                conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (11, "r"))
                conn.execute(f"SELECT * FROM {T}_missing_table")
                conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (12, "r"))
            raise Fail("error in pipeline not raised")
        except errors.UndefinedTable:
            pass
        row = conn.execute(f"SELECT count(*) FROM {t}").fetchone()
        check(row == (10,), f"count after failed pipeline {row} (the implicit transaction up to the sync rolls back)")
        # commit() queued in the pipeline behind the writes: one batch up to
        # its sync holds the writes and the COMMIT
        with connect(autocommit=False) as tx:
            with tx.pipeline():
                tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (13, "s"))
                tx.execute(f"UPDATE {t} SET v = v || '+' WHERE id = %s", (13,))
                tx.commit()
                tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (14, "s"))
                tx.commit()
            try:
                with tx.pipeline():
                    tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (15, "t"))
                    tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (13, "dup"))
                    tx.commit()
                raise Fail("duplicate key in a committed pipeline not raised")
            except errors.UniqueViolation:
                tx.rollback()
            with tx.pipeline():
                tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (16, "u"))
                tx.rollback()
            # a result fetched inside the pipeline (a Flush, not a Sync), then more
            # writes and the commit
            with tx.pipeline():
                got = tx.execute(f"INSERT INTO {t} VALUES (%s, %s) RETURNING id", (17, "w")).fetchone()
                tx.execute(f"INSERT INTO {t} VALUES (%s, %s)", (got[0] + 1, "x"))
                tx.commit()
            # (read in a transaction: on the primary, which has every commit;
            # the copies are compared after the feature)
            row = tx.execute(f"SELECT count(*), string_agg(v, ',' ORDER BY id) FROM {t} WHERE id > 12").fetchone()
            tx.rollback()
        check(row == (4, "s+,s,w,x"), f"rows committed in pipelines {row}")
    return "5 inserts + select; executemany + sync in tx; error recovery; commit in pipeline, also after a fetch"


def f_listen_notify():
    chan = f"{T}_chan"
    with connect() as listener, connect() as sender:
        listener.execute(f"LISTEN {chan}")
        payload = "hello from compat-psycopg \u00e9"
        sender.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(chan), sql.Literal(payload)))
        sender.execute("SELECT pg_notify(%s, %s)", (chan, "second"))
        got = []
        t0 = time.monotonic()
        for n in listener.notifies(timeout=5, stop_after=2):
            got.append((n.channel, n.payload))
        took = time.monotonic() - t0
        check(got == [(chan, payload), (chan, "second")], f"got {got} after {took:.1f} s")
        # a notification sent in a transaction arrives at commit
        with sender.transaction():
            sender.execute("SELECT pg_notify(%s, %s)", (chan, "in tx"))
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        check(got == [(chan, "in tx")], f"transactional notify: {got}")
        listener.execute(f"UNLISTEN {chan}")
        check(listener.execute("SELECT 1").fetchone() == (1,), "listener usable")
    return f"2 notifications in {took:.2f} s; transactional one"


def f_types():
    tz = zoneinfo.ZoneInfo("America/St_Johns")  # UTC-3:30 / -2:30
    with connect() as conn:
        t = f"{T}_types"
        replicated(t)
        reset_table(
            conn,
            t,
            "id int primary key, ia int[], ia2 int[], ta text[], j json, jb jsonb, n numeric, "
            "ts timestamptz, b bytea, u uuid, f8 float8, d date",
        )
        rows = []
        for i in range(1, 4):
            rows.append(
                (
                    i,
                    [1, -2, 2147483647, -2147483648, None, i],
                    [[1, 2], [3, 4 + i]],
                    ["a", "b c", "", None, "\u00e9\u00e8 \"q\" {x}", f"t{i}"],
                    Json({"k": [1, 2, {"x": None}], "s": "j\u00e9", "i": i}),
                    Jsonb({"nested": {"deep": [True, False, None]}, "num": 1.5, "i": i, "big": 12345678901234567890}),
                    Decimal("-12345678901234567890123456789.123456789012345678901234567890") + i,
                    datetime.datetime(2024, 3, 10, 1, 59, 59, 123456 + i, tzinfo=tz),
                    bytes(range(256)) + bytes([i]),
                    uuid.uuid4(),
                    1.0 / 3.0 + i,
                    datetime.date(1999, 12, 31) + datetime.timedelta(days=i),
                )
            )
        with conn.cursor(binary=True) as cur:
            for r in rows:
                cur.execute(f"INSERT INTO {t} VALUES (%b, %b, %b, %b, %b, %b, %b, %b, %b, %b, %b, %b)", r)
                check(cur.rowcount == 1, "insert rowcount")
            cur.execute(f"SELECT * FROM {t} ORDER BY id")
            check(cur.pgresult.fformat(0) == 1, "result not binary")
            got = cur.fetchall()
        check(len(got) == 3, f"{len(got)} rows")
        names = ["id", "ia", "ia2", "ta", "j", "jb", "n", "ts", "b", "u", "f8", "d"]
        for r, g in zip(rows, got):
            exp = list(r)
            exp[4] = r[4].obj
            exp[5] = r[5].obj
            for name, e, a in zip(names, exp, g):
                check(e == a, f"row {r[0]} {name}: sent {e!r} got {a!r}")
        # the instant and the offset both survive: compare in UTC
        check(got[0][7].astimezone(datetime.timezone.utc) == rows[0][7].astimezone(datetime.timezone.utc), "ts utc")
        # text-format results for the same rows agree
        with conn.cursor(binary=False) as cur:
            cur.execute(f"SELECT n, b, u, ts FROM {t} WHERE id = %s", (1,))
            n, b, u, ts = cur.fetchone()
        check((n, b, u, ts) == (rows[0][6], rows[0][8], rows[0][9], rows[0][7]), "text-format read mismatch")
        # a select with binary parameters only (read path)
        with conn.cursor(binary=True) as cur:
            cur.execute(f"SELECT id FROM {t} WHERE u = %b AND b = %b AND n = %b", (rows[1][9], rows[1][8], rows[1][6]))
            check(cur.fetchall() == [(2,)], "lookup by binary params")
    return "int[], text[], json, jsonb, numeric, timestamptz, bytea(256), uuid, float8, date"


FEATURES = [
    ("routing", f_routing),
    ("read_own_write", f_read_own_write),
    ("error_recovery", f_error_recovery),
    ("cancel", f_cancel),
    ("transaction", f_transaction),
    ("simple_query", f_simple_query),
    ("extended_query", f_extended_query),
    ("server_side_cursor", f_server_side_cursor),
    ("copy_in", f_copy_in),
    ("copy_out", f_copy_out),
    ("pipeline", f_pipeline),
    ("listen_notify", f_listen_notify),
    ("types", f_types),
]


def main():
    log(f"psycopg {psycopg.__version__}, libpq {psycopg.pq.version()}, mode {os.environ.get('COMPAT_MODE')}")
    signal.signal(signal.SIGALRM, _alarm)
    only = set(sys.argv[1:])  # optional: run only the named features
    for name, fn in FEATURES:
        if only and name not in only:
            continue
        TABLES.clear()
        t0 = time.monotonic()
        signal.alarm(FEATURE_TIMEOUT)
        try:
            detail = fn()
            problem = verify_replication()
            signal.alarm(0)
            if problem:
                report(name, False, f"copies differ after the feature ran: {problem}")
            else:
                report(name, True, f"{detail} ({time.monotonic() - t0:.2f} s)")
        except Exception as e:  # noqa: BLE001 - every failure becomes a report line
            signal.alarm(0)
            log(f"--- {name} failed:\n{traceback.format_exc()}")
            state = sqlstate_of(e)
            report(name, False, f"{type(e).__name__}{' ' + state if state else ''}: {e}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
