// pgjdbc compatibility suite (see ../README.md for the contract).
// One JSON line per feature on stdout; everything else on stderr.

import java.math.BigDecimal;
import java.sql.Array;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.postgresql.PGStatement;
import org.postgresql.util.PGobject;

public class Suite {
    static final String APP = "compat-jdbc";
    static final long FEATURE_TIMEOUT_MS = 8000;

    static final List<Connection> open = new ArrayList<>();
    static Connection c; // the suite's main connection; replaced after a failed feature
    static final ExecutorService runner = Executors.newCachedThreadPool(r -> {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    });
    static final ScheduledExecutorService timers = Executors.newScheduledThreadPool(1, r -> {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    });

    static class Check extends Exception {
        Check(String m) { super(m); }
    }

    static void check(boolean cond, String msg) throws Check {
        if (!cond) throw new Check(msg);
    }

    static void eq(Object actual, Object expected, String what) throws Check {
        boolean same = actual == null ? expected == null : actual.equals(expected);
        if (!same) throw new Check(what + ": got " + actual + ", want " + expected);
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                case '\b': b.append("\\b"); break;
                case '\f': b.append("\\f"); break;
                default:
                    if (c < 0x20 || c == 0x2028 || c == 0x2029) b.append(String.format("\\u%04x", (int) c));
                    else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    static synchronized void emit(String feature, boolean ok, String detail) {
        if (detail == null) detail = "";
        if (detail.length() > 300) detail = detail.substring(0, 300);
        System.out.println("{\"feature\":" + json(feature) + ",\"ok\":" + ok + ",\"detail\":" + json(detail) + "}");
        System.out.flush();
    }

    static void log(String s) {
        System.err.println("[jdbc-suite] " + s);
    }

    static String env(String k, String dflt) {
        String v = System.getenv(k);
        return v == null || v.isEmpty() ? dflt : v;
    }

    static Connection connect(String... extra) throws SQLException {
        String host = env("PGHOST", "127.0.0.1");
        if (host.startsWith("/")) host = "127.0.0.1"; // pgjdbc speaks TCP only
        String url = "jdbc:postgresql://" + host + ":" + env("PGPORT", "5432") + "/" + env("PGDATABASE", "postgres");
        Properties p = new Properties();
        p.setProperty("user", env("PGUSER", "postgres"));
        p.setProperty("ApplicationName", APP);
        p.setProperty("connectTimeout", "5");
        p.setProperty("socketTimeout", "15");
        p.setProperty("cancelSignalTimeout", "3");
        for (int i = 0; i + 1 < extra.length; i += 2) p.setProperty(extra[i], extra[i + 1]);
        Connection conn = DriverManager.getConnection(url, p);
        synchronized (open) { open.add(conn); }
        return conn;
    }

    static void abort(Connection c) {
        try { c.abort(Runnable::run); } catch (Throwable e) { /* ignore */ }
    }

    // Whatever a failure left behind (a stuck query, an open transaction)
    // must not leak into the next feature.
    static void reconnect() {
        abort(c);
        try {
            c = connect();
        } catch (SQLException e) {
            log("reconnect failed: " + e);
        }
    }

    interface Body { String run() throws Exception; }

    // Runs one feature with a bound on its duration; connections it opened are
    // aborted if it overruns, so a stuck query cannot hang the suite.
    static void feature(String name, Body body) {
        int before;
        synchronized (open) { before = open.size(); }
        long started = System.nanoTime();
        Future<String> f = runner.submit((Callable<String>) body::run);
        try {
            String detail = f.get(FEATURE_TIMEOUT_MS, TimeUnit.MILLISECONDS);
            emit(name, true, detail == null ? "ok" : detail);
        } catch (TimeoutException e) {
            log(name + " timed out");
            emit(name, false, "timed out after " + FEATURE_TIMEOUT_MS + " ms");
            synchronized (open) { for (Connection x : open.subList(before, open.size())) abort(x); }
            f.cancel(true);
            reconnect();
        } catch (Exception e) {
            Throwable t = e.getCause() != null ? e.getCause() : e;
            String msg;
            if (t instanceof Check) msg = t.getMessage();
            else if (t instanceof SQLException) msg = ((SQLException) t).getSQLState() + " " + t.getMessage();
            else msg = t.toString();
            log(name + " failed: " + msg);
            if (!(t instanceof Check)) t.printStackTrace();
            emit(name, false, msg);
            synchronized (open) { for (Connection x : open.subList(before, open.size())) abort(x); }
            reconnect();
        } finally {
            log(name + ": " + (System.nanoTime() - started) / 1_000_000 + " ms");
        }
    }

    static SQLException expectError(String code, String what, Callable<?> body) throws Exception {
        try {
            body.call();
        } catch (SQLException e) {
            if (code.equals(e.getSQLState())) return e;
            throw new Check(what + ": expected SQLSTATE " + code + ", got " + e.getSQLState() + " " + e.getMessage());
        }
        throw new Check(what + ": expected SQLSTATE " + code + ", but it succeeded");
    }

    static Object one(Connection c, String sql, Object... params) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int i = 0; i < params.length; i++) ps.setObject(i + 1, params[i]);
            try (ResultSet rs = ps.executeQuery()) {
                if (!rs.next()) return null;
                return rs.getObject(1);
            }
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) { s.execute(sql); }
    }

    static void recreate(Connection c, String table, String columns) throws SQLException {
        exec(c, "DROP TABLE IF EXISTS " + table);
        exec(c, "CREATE TABLE " + table + " (" + columns + ")");
    }

    static List<String> ids(Connection c, String table) throws SQLException {
        List<String> out = new ArrayList<>();
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT id, v FROM " + table + " ORDER BY id")) {
            while (rs.next()) out.add(rs.getInt(1) + ":" + rs.getString(2));
        }
        return out;
    }

    public static void main(String[] args) throws Exception {
        Thread watchdog = new Thread(() -> {
            try { Thread.sleep(60_000); } catch (InterruptedException e) { return; }
            log("suite watchdog: giving up after 60 s");
            Runtime.getRuntime().halt(2);
        });
        watchdog.setDaemon(true);
        watchdog.start();

        c = connect();

        feature("routing", () -> {
            recreate(c, "compat_jdbc_reads", "id int primary key, v text");
            recreate(c, "compat_jdbc_writes", "id int primary key, v text");
            exec(c, "INSERT INTO compat_jdbc_reads SELECT g, 'r' || g FROM generate_series(1, 10) g");
            Thread.sleep(1000);
            try (PreparedStatement ps = c.prepareStatement("SELECT v FROM compat_jdbc_reads WHERE id = ?")) {
                for (int i = 0; i < 20; i++) {
                    int id = i % 10 + 1;
                    ps.setInt(1, id);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "read " + i + ": no row");
                        eq(rs.getString(1), "r" + id, "read " + i);
                        check(!rs.next(), "read " + i + ": more than one row");
                    }
                }
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_writes (id, v) VALUES (?, ?)")) {
                for (int i = 1; i <= 5; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "w" + i);
                    eq(ps.executeUpdate(), 1, "insert " + i);
                }
            }
            return "20 reads, 5 writes";
        });

        feature("read_own_write", () -> {
            recreate(c, "compat_jdbc_row", "id int primary key, v text");
            for (int i = 1; i <= 5; i++) {
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_row VALUES (?, ?)")) {
                    ps.setInt(1, i);
                    ps.setString(2, "own" + i);
                    ps.executeUpdate();
                }
                eq(one(c, "SELECT v FROM compat_jdbc_row WHERE id = ?", i), "own" + i, "select after insert " + i);
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT v FROM compat_jdbc_row WHERE id = " + i)) {
                    check(rs.next(), "simple select after insert " + i + ": no row");
                    eq(rs.getString(1), "own" + i, "simple select after insert " + i);
                }
            }
            return "5 insert+select pairs";
        });

        feature("error_recovery", () -> {
            expectError("42P01", "statement", () -> { exec(c, "SELECT * FROM compat_jdbc_missing"); return null; });
            eq(one(c, "SELECT 1"), 1, "after error");
            expectError("42P01", "prepared", () -> one(c, "SELECT * FROM compat_jdbc_missing WHERE id = ?", 1));
            eq(one(c, "SELECT ?::int", 2), 2, "after prepared error");
            exec(c, "BEGIN");
            expectError("42P01", "in transaction", () -> { exec(c, "SELECT * FROM compat_jdbc_missing"); return null; });
            expectError("25P02", "aborted transaction", () -> one(c, "SELECT 1"));
            exec(c, "ROLLBACK");
            exec(c, "BEGIN");
            eq(one(c, "SELECT 3"), 3, "next transaction");
            exec(c, "COMMIT");
            // The same with the driver's transaction API.
            c.setAutoCommit(false);
            try {
                expectError("42P01", "autocommit off", () -> one(c, "SELECT * FROM compat_jdbc_missing"));
                c.rollback();
                eq(one(c, "SELECT 4"), 4, "after rollback()");
                c.commit();
            } finally {
                c.setAutoCommit(true);
            }
            return "42P01 outside and inside a transaction, recovered";
        });

        feature("cancel", () -> {
            try (Connection k = connect(); Statement s = k.createStatement()) {
                long started = System.nanoTime();
                ScheduledFuture<?> t = timers.schedule(() -> {
                    try { s.cancel(); } catch (SQLException e) { log("cancel() failed: " + e); }
                }, 500, TimeUnit.MILLISECONDS);
                SQLException e = expectError("57014", "cancelled pg_sleep", () -> s.executeQuery("SELECT pg_sleep(10)"));
                t.get(3, TimeUnit.SECONDS);
                long took = (System.nanoTime() - started) / 1_000_000;
                check(took < 5000, "cancel took " + took + " ms");
                eq(one(k, "SELECT 1"), 1, "after cancel");
                try (ResultSet rs = s.executeQuery("SELECT 2")) {
                    check(rs.next() && rs.getInt(1) == 2, "same statement after cancel");
                }
                return "57014 after " + took + " ms (" + e.getMessage() + ")";
            }
        });

        feature("transaction", () -> {
            recreate(c, "compat_jdbc_tx", "id int primary key, v text");
            exec(c, "BEGIN");
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_tx VALUES (?, ?)")) {
                ps.setInt(1, 1);
                ps.setString(2, "a");
                ps.executeUpdate();
            }
            exec(c, "INSERT INTO compat_jdbc_tx VALUES (2, 'b')");
            exec(c, "COMMIT");
            exec(c, "BEGIN");
            exec(c, "INSERT INTO compat_jdbc_tx VALUES (3, 'c')");
            eq(one(c, "SELECT count(*)::int FROM compat_jdbc_tx"), 3, "inside rolled-back tx");
            exec(c, "ROLLBACK");
            eq(ids(c, "compat_jdbc_tx"), Arrays.asList("1:a", "2:b"), "rows after commit+rollback");
            return "committed rows only";
        });

        feature("prepare_threshold", () -> {
            recreate(c, "compat_jdbc_pt", "id int primary key, v text");
            try (Connection p = connect("prepareThreshold", "3")) {
                boolean serverBefore = false;
                boolean serverAfter = false;
                try (PreparedStatement ins = p.prepareStatement("INSERT INTO compat_jdbc_pt (id, v) VALUES (?, ?)")) {
                    for (int i = 1; i <= 10; i++) {
                        ins.setInt(1, i);
                        ins.setString(2, "p" + i);
                        eq(ins.executeUpdate(), 1, "insert " + i);
                    }
                    check(ins.unwrap(PGStatement.class).isUseServerPrepare(), "insert never became server-prepared");
                }
                try (PreparedStatement sel = p.prepareStatement("SELECT v, ?::int AS k FROM compat_jdbc_pt WHERE id = ?")) {
                    for (int i = 1; i <= 10; i++) {
                        if (i == 1) serverBefore = sel.unwrap(PGStatement.class).isUseServerPrepare();
                        int id = 11 - i;
                        sel.setInt(1, i * 100);
                        sel.setInt(2, id);
                        try (ResultSet rs = sel.executeQuery()) {
                            check(rs.next(), "select " + i + ": no row");
                            eq(rs.getString(1), "p" + id, "select " + i + " v");
                            eq(rs.getInt(2), i * 100, "select " + i + " k");
                            check(!rs.next(), "select " + i + ": extra row");
                        }
                    }
                    serverAfter = sel.unwrap(PGStatement.class).isUseServerPrepare();
                }
                check(!serverBefore && serverAfter, "server prepare before=" + serverBefore + " after=" + serverAfter);
                // Inside a transaction too, with a fresh statement crossing the threshold.
                p.setAutoCommit(false);
                try (PreparedStatement upd = p.prepareStatement("UPDATE compat_jdbc_pt SET v = v || ? WHERE id = ?")) {
                    for (int i = 1; i <= 10; i++) {
                        upd.setString(1, "!");
                        upd.setInt(2, i);
                        eq(upd.executeUpdate(), 1, "update " + i);
                    }
                }
                p.commit();
                p.setAutoCommit(true);
                eq(one(p, "SELECT string_agg(v, ',' ORDER BY id) FROM compat_jdbc_pt"),
                        "p1!,p2!,p3!,p4!,p5!,p6!,p7!,p8!,p9!,p10!", "rows");
            }
            return "10 inserts, 10 selects, 10 updates; server-prepared after 3";
        });

        feature("batch", () -> {
            recreate(c, "compat_jdbc_batch", "id int primary key, v text");
            StringBuilder detail = new StringBuilder();
            for (String rewrite : new String[] {"true", "false"}) {
                int base = rewrite.equals("true") ? 0 : 1000;
                try (Connection b = connect("reWriteBatchedInserts", rewrite);
                     PreparedStatement ps = b.prepareStatement("INSERT INTO compat_jdbc_batch (id, v) VALUES (?, ?)")) {
                    for (int i = 1; i <= 100; i++) {
                        ps.setInt(1, base + i);
                        ps.setString(2, "b" + (base + i));
                        ps.addBatch();
                    }
                    int[] counts = ps.executeBatch();
                    eq(counts.length, 100, "rewrite=" + rewrite + " counts");
                    int sum = 0;
                    for (int n : counts) {
                        check(n == 1 || n == Statement.SUCCESS_NO_INFO, "rewrite=" + rewrite + " count " + n);
                        sum += n == 1 ? 1 : 0;
                    }
                    eq(one(b, "SELECT count(*)::int FROM compat_jdbc_batch WHERE id > ? AND id <= ?", base, base + 100), 100,
                            "rewrite=" + rewrite + " rows");
                    detail.append("rewrite=").append(rewrite).append(": 100 rows (").append(sum).append(" counted); ");
                }
            }
            // A batch inside a transaction with a failing row: nothing of it stays.
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_batch (id, v) VALUES (?, ?)")) {
                for (int i = 1; i <= 5; i++) {
                    ps.setInt(1, 2000 + i);
                    ps.setString(2, "x");
                    ps.addBatch();
                }
                ps.setInt(1, 1); // duplicate key
                ps.setString(2, "dup");
                ps.addBatch();
                try {
                    ps.executeBatch();
                    throw new Check("duplicate in batch did not fail");
                } catch (java.sql.BatchUpdateException e) {
                    SQLException n = e.getNextException();
                    String state = n != null ? n.getSQLState() : e.getSQLState();
                    eq(state, "23505", "batch error");
                }
                c.rollback();
            } finally {
                c.setAutoCommit(true);
            }
            eq(one(c, "SELECT count(*)::int FROM compat_jdbc_batch"), 200, "rows after failed batch");
            return detail.toString() + "failed batch rolled back";
        });

        feature("autocommit_false", () -> {
            recreate(c, "compat_jdbc_ac", "id int primary key, v text");
            try (Connection a = connect()) {
                a.setAutoCommit(false);
                try (PreparedStatement ps = a.prepareStatement("INSERT INTO compat_jdbc_ac VALUES (?, ?)")) {
                    for (int i = 1; i <= 3; i++) {
                        ps.setInt(1, i);
                        ps.setString(2, "a" + i);
                        ps.executeUpdate();
                    }
                }
                exec(a, "UPDATE compat_jdbc_ac SET v = v || '+' WHERE id = 2");
                eq(one(a, "SELECT count(*)::int FROM compat_jdbc_ac"), 3, "count inside transaction");
                a.commit();
                // Read-only first statement, then a write, then rollback.
                eq(one(a, "SELECT count(*)::int FROM compat_jdbc_ac"), 3, "read opening second transaction");
                exec(a, "INSERT INTO compat_jdbc_ac VALUES (4, 'a4')");
                exec(a, "DELETE FROM compat_jdbc_ac WHERE id = 1");
                eq(one(a, "SELECT count(*)::int FROM compat_jdbc_ac"), 3, "count inside rolled-back transaction");
                a.rollback();
                // A transaction that only reads, committed.
                eq(one(a, "SELECT v FROM compat_jdbc_ac WHERE id = ?", 2), "a2+", "read-only transaction");
                a.commit();
                a.setAutoCommit(true);
                eq(ids(a, "compat_jdbc_ac"), Arrays.asList("1:a1", "2:a2+", "3:a3"), "rows");
            }
            eq(ids(c, "compat_jdbc_ac"), Arrays.asList("1:a1", "2:a2+", "3:a3"), "rows on another connection");
            return "commit kept 3 rows, rollback undone";
        });

        feature("fetch_size", () -> {
            recreate(c, "compat_jdbc_fetch", "id int primary key, v text");
            exec(c, "INSERT INTO compat_jdbc_fetch SELECT g, 'f' || g FROM generate_series(1, 1000) g");
            c.setAutoCommit(false);
            int total = 0;
            try {
                try (Statement s = c.createStatement()) {
                    s.setFetchSize(50);
                    try (ResultSet rs = s.executeQuery("SELECT id, v FROM compat_jdbc_fetch ORDER BY id")) {
                        eq(rs.getFetchSize(), 50, "fetch size");
                        int expected = 1;
                        while (rs.next()) {
                            check(rs.getInt(1) == expected && ("f" + expected).equals(rs.getString(2)), "row " + expected);
                            expected++;
                            total++;
                        }
                    }
                }
                // A prepared statement with parameters, streamed the same way.
                try (PreparedStatement ps = c.prepareStatement("SELECT id FROM compat_jdbc_fetch WHERE id > ? ORDER BY id")) {
                    ps.setFetchSize(50);
                    ps.setInt(1, 500);
                    int n = 0;
                    long sum = 0;
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) { n++; sum += rs.getInt(1); }
                    }
                    eq(n, 500, "prepared streamed rows");
                    eq(sum, 375250L, "prepared streamed sum");
                }
                c.commit();
            } finally {
                c.setAutoCommit(true);
            }
            eq(total, 1000, "rows");
            eq(one(c, "SELECT 1"), 1, "after fetch");
            return "1000 rows fetched 50 at a time";
        });

        feature("types", () -> {
            recreate(c, "compat_jdbc_types",
                    "id int primary key, j jsonb, ia int[], ta text[], b bytea, n numeric, ts timestamptz, u uuid");
            String jsonText = "{\"a\": 1, \"b\": [true, null, \"x \\\"y\\\" \u00fc\"], \"c\": {\"d\": 1.5}}";
            PGobject jo = new PGobject();
            jo.setType("jsonb");
            jo.setValue(jsonText);
            Integer[] ia = {1, -2, 3};
            String[] ta = {"a", "b,c", "d \"e\"", null};
            byte[] bytes = new byte[256];
            for (int i = 0; i < 256; i++) bytes[i] = (byte) i;
            BigDecimal num = new BigDecimal("12345678901234567890.123456789012");
            OffsetDateTime ts = OffsetDateTime.of(2024, 2, 29, 12, 34, 56, 789_123_000, ZoneOffset.ofHours(2));
            UUID u = UUID.fromString("0b6f5c1e-3d4a-4c2b-9f1e-7a8b9c0d1e2f");
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_types VALUES (?, ?, ?, ?, ?, ?, ?, ?)")) {
                ps.setInt(1, 1);
                ps.setObject(2, jo);
                ps.setArray(3, c.createArrayOf("int4", ia));
                ps.setArray(4, c.createArrayOf("text", ta));
                ps.setBytes(5, bytes);
                ps.setBigDecimal(6, num);
                ps.setObject(7, ts);
                ps.setObject(8, u);
                eq(ps.executeUpdate(), 1, "insert 1");
            }
            // jsonb through a cast of a string parameter.
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO compat_jdbc_types (id, j) VALUES (?, ?::jsonb)")) {
                ps.setInt(1, 2);
                ps.setString(2, jsonText);
                eq(ps.executeUpdate(), 1, "insert 2");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT j, ia, ta, b, n, ts, u, j = ?::jsonb FROM compat_jdbc_types WHERE id = ?")) {
                ps.setString(1, jsonText);
                ps.setInt(2, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "no row");
                    eq(rs.getString(1), jsonText, "jsonb text");
                    Object jv = rs.getObject(1);
                    check(jv instanceof PGobject && "jsonb".equals(((PGobject) jv).getType()), "jsonb object " + jv);
                    Array a = rs.getArray(2);
                    eq(Arrays.toString((Object[]) a.getArray()), Arrays.toString(ia), "int[]");
                    eq(Arrays.toString((Object[]) rs.getArray(3).getArray()), Arrays.toString(ta), "text[]");
                    check(Arrays.equals(rs.getBytes(4), bytes), "bytea differs");
                    BigDecimal n = rs.getBigDecimal(5);
                    check(n.compareTo(num) == 0 && n.scale() == num.scale(), "numeric " + n);
                    OffsetDateTime got = rs.getObject(6, OffsetDateTime.class);
                    check(got.isEqual(ts), "timestamptz " + got + " vs " + ts);
                    eq(rs.getObject(7, UUID.class), u, "uuid");
                    eq(rs.getObject(7), u, "uuid getObject");
                    eq(rs.getBoolean(8), true, "jsonb equality");
                }
            }
            eq(one(c, "SELECT (SELECT j FROM compat_jdbc_types WHERE id = 1) = j FROM compat_jdbc_types WHERE id = ?", 2),
                    true, "jsonb via cast equals jsonb via PGobject");
            eq(one(c, "SELECT n * 2 FROM compat_jdbc_types WHERE id = ?", 1),
                    new BigDecimal("24691357802469135780.246913578024"), "numeric arithmetic");
            eq(one(c, "SELECT u FROM compat_jdbc_types WHERE u = ?", u), u, "uuid parameter in WHERE");
            eq(one(c, "SELECT count(*)::int FROM compat_jdbc_types WHERE ts = ?", ts), 1, "timestamptz parameter in WHERE");
            return "jsonb, int[], text[], bytea, numeric, timestamptz, uuid";
        });

        synchronized (open) {
            for (Connection x : open) {
                try { x.close(); } catch (Throwable e) { abort(x); }
            }
        }
        System.out.flush();
        System.exit(0);
    }
}
