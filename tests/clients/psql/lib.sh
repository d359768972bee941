# Shared by the psql and pgbench suites (sourced; DRIVER must be set):
# JSON records, psql helpers, and the contract's common features checked
# with psql (see ../README.md). Connects through PGHOST, PGPORT, PGUSER,
# PGDATABASE; every session is named compat-$DRIVER.

export PGAPPNAME="compat-$DRIVER"
export PGCONNECT_TIMEOUT=10
T="compat_$DRIVER"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The string as the inside of a JSON string.
json_escape() {
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/\\r}
    s=${s//$'\n'/\\n}
    printf '%s' "$s"
}

# record FEATURE true|false DETAIL: one JSON line on stdout.
record() {
    printf '{"feature": "%s", "ok": %s, "detail": "%s"}\n' "$1" "$2" "$(json_escape "$3")"
}

# check FEATURE FUNCTION: runs the function; its last output line is the
# detail (the failure's reason when it returns non-zero). Its whole output
# also goes to stderr.
check() {
    local out status
    out=$("$2" 2>&1)
    status=$?
    printf -- '-- %s (%s)\n%s\n' "$1" "$status" "$out" >&2
    if [ "$status" -eq 0 ]; then
        record "$1" true "$(tail -n 1 <<<"$out")"
    else
        record "$1" false "$(tail -n 3 <<<"$out")"
    fi
}

# fail MESSAGE: prints it and returns 1 (use as `fail "..."; return`).
fail() {
    printf '%s\n' "$1"
    return 1
}

# q [psql args]: psql with the script on stdin, unaligned tuples only,
# stopping at the first error.
q() {
    psql -X -q -At -v ON_ERROR_STOP=1 "$@"
}

# The major version of psql.
psql_major() {
    psql --version | sed -E 's/[^0-9]*([0-9]+).*/\1/'
}

common_read_own_write() {
    local out
    out=$(q <<SQL) || { fail "psql failed: $out"; return; }
DROP TABLE IF EXISTS ${T}_own;
CREATE TABLE ${T}_own (id int PRIMARY KEY, v text);
INSERT INTO ${T}_own VALUES (1, 'mine 1');
SELECT v FROM ${T}_own WHERE id = 1;
INSERT INTO ${T}_own VALUES (2, 'mine 2');
SELECT v FROM ${T}_own WHERE id = 2;
SQL
    [ "$out" = $'mine 1\nmine 2' ] || { fail "read back: $out"; return; }
    echo "2 inserts, each read back at once in the same session"
}

common_error_recovery() {
    local out
    out=$(q <<SQL)
\set ON_ERROR_STOP 0
DROP TABLE IF EXISTS ${T}_errors;
CREATE TABLE ${T}_errors (id int PRIMARY KEY);
SELECT * FROM ${T}_missing;
\echo state :LAST_ERROR_SQLSTATE
SELECT 'after';
BEGIN;
INSERT INTO ${T}_errors VALUES (1);
SELECT * FROM ${T}_missing;
\echo state :LAST_ERROR_SQLSTATE
SELECT 1;
\echo state :SQLSTATE
ROLLBACK;
BEGIN;
INSERT INTO ${T}_errors VALUES (2);
COMMIT;
SELECT string_agg(id::text, ',' ORDER BY id) FROM ${T}_errors;
SQL
    local want
    want=$(printf '%s\n' "state 42P01" "after" "state 42P01" "state 25P02" "2")
    # psql's ERROR lines went to stderr (shown with the output).
    [ "$(grep -v '^ERROR\|^LINE\|^ *\^' <<<"$out")" = "$want" ] \
        || { fail "output: $out"; return; }
    echo "42P01, then the session works; in a transaction 42P01, 25P02, ROLLBACK, next COMMIT"
}

# psql has no cancel call: Ctrl-C (SIGINT) makes libpq send a CancelRequest.
common_cancel() {
    local err="$WORK/cancel.err" start took status out
    start=$(date +%s%N)
    psql -X -q -At -v VERBOSITY=verbose -c "SELECT pg_sleep(10)" >/dev/null 2>"$err" &
    local pid=$!
    sleep 0.5
    kill -INT "$pid"
    wait "$pid"
    status=$?
    took=$((($(date +%s%N) - start) / 1000000))
    cat "$err"
    grep -q "57014" "$err" && grep -q "canceling statement due to user request" "$err" \
        || { fail "psql ended with status $status without 57014: $(cat "$err")"; return; }
    [ "$took" -lt 5000 ] || { fail "the cancelled query ended after $took ms"; return; }
    out=$(q -c "SELECT 'usable'") && [ "$out" = usable ] \
        || { fail "a session after the cancel: $out"; return; }
    echo "SIGINT to psql: 57014 after $took ms (psql then exits; a new session works)"
}

common_transaction() {
    local out
    out=$(q <<SQL) || { fail "psql failed: $out"; return; }
DROP TABLE IF EXISTS ${T}_tx;
CREATE TABLE ${T}_tx (id int PRIMARY KEY);
BEGIN;
INSERT INTO ${T}_tx VALUES (1);
INSERT INTO ${T}_tx VALUES (2);
COMMIT;
BEGIN;
INSERT INTO ${T}_tx VALUES (3);
ROLLBACK;
SELECT string_agg(id::text, ',' ORDER BY id) FROM ${T}_tx;
SQL
    [ "$out" = "1,2" ] || { fail "rows: $out"; return; }
    echo "committed rows only"
}
