-- The reprise schema, installed by the proxy on every node of a group at
-- start (idempotent: creates what is missing, replaces the functions, so it
-- also upgrades in place). It never touches user tables. Version 1.
CREATE SCHEMA IF NOT EXISTS reprise;

-- This node's own state: its term and role.
CREATE TABLE IF NOT EXISTS reprise.node (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_version integer NOT NULL,
    term bigint NOT NULL DEFAULT 1,
    role text NOT NULL DEFAULT 'subscriber'
);

-- The log: one entry per committed write transaction, in commit order.
-- A node's highest seq is its applied position.
CREATE TABLE IF NOT EXISTS reprise.log (
    seq bigint PRIMARY KEY,
    term bigint NOT NULL,
    payload bytea NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    -- Sequence states before and after, when the transaction changed any:
    -- a JSON array [before, after] of reprise.sequences() results.
    sequences text,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Columns added after version 1 (upgrades in place).
ALTER TABLE reprise.log ADD COLUMN IF NOT EXISTS sequences text;
-- The primary this node last heard of (recorded at every promotion), so a
-- proxy that starts while the primary is down still knows which node it was.
ALTER TABLE reprise.node ADD COLUMN IF NOT EXISTS primary_node text;
-- Values a write transaction captured on the primary (reprise.captured):
-- a JSON array of their text, in the order they were computed.
ALTER TABLE reprise.log ADD COLUMN IF NOT EXISTS captured text;

-- A value's text and back, under fixed settings, so that it reads back
-- exactly (all float digits, ISO dates in UTC, hex bytea) whatever the
-- session's settings are.
CREATE OR REPLACE FUNCTION reprise.exact_text(p anyelement)
RETURNS text LANGUAGE plpgsql
SET extra_float_digits = 3 SET "DateStyle" = 'ISO, YMD' SET "TimeZone" = 'UTC'
SET "IntervalStyle" = 'postgres' SET bytea_output = 'hex' AS $fn$
BEGIN
    RETURN p::text;
END
$fn$;

CREATE OR REPLACE FUNCTION reprise.from_exact_text(p text, p_like anyelement)
RETURNS anyelement LANGUAGE plpgsql
SET extra_float_digits = 3 SET "DateStyle" = 'ISO, YMD' SET "TimeZone" = 'UTC'
SET "IntervalStyle" = 'postgres' SET bytea_output = 'hex' AS $fn$
DECLARE
    r ALIAS FOR $0;
BEGIN
    r := p;
    RETURN r;
END
$fn$;

-- Row capture of a volatile value (random(), gen_random_uuid(),
-- clock_timestamp(), a volatile column default…), which the proxy wraps
-- in this call. On the primary it returns the value and records it in the
-- transaction; the append logs the record with the entry. On replay (the
-- applier sets reprise.replay_values and reprise.replay_pos) it returns the
-- recorded value in the same order instead of the one computed here.
--
-- The record is kept in settings local to the transaction (rolled back
-- with a savepoint), in chunks of 100 values: each call reads and writes
-- one chunk, so a statement capturing n values takes time in proportion
-- to n (one growing list would be read and written whole by every call).
CREATE OR REPLACE FUNCTION reprise.captured(p anyelement)
RETURNS anyelement LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_pos integer;
    v_count integer;
    v_chunk text;
BEGIN
    IF coalesce(current_setting('reprise.replay_pos', true), '') <> '' THEN
        v_count := reprise.replay_split();
        v_pos := current_setting('reprise.replay_pos')::integer;
        IF v_pos >= v_count THEN
            -- Values taken in a part the primary rolled back to a
            -- savepoint were not recorded; the replay rolls that part
            -- back too, and with it this mark (see replay_check).
            PERFORM set_config('reprise.replay_unrecorded',
                format('the entry recorded %s captured values, its replay asks for more', v_pos), true);
            RETURN p;
        END IF;
        PERFORM set_config('reprise.replay_pos', (v_pos + 1)::text, true);
        RETURN reprise.from_exact_text(
            current_setting('reprise.replay_' || (v_pos / 100))::jsonb ->> (v_pos % 100), p);
    END IF;
    v_count := coalesce(nullif(current_setting('reprise.captured_n', true), ''), '0')::integer;
    v_chunk := CASE WHEN v_count % 100 = 0 THEN ''
                    ELSE current_setting('reprise.captured_' || (v_count / 100)) || ',' END;
    PERFORM set_config('reprise.captured_' || (v_count / 100),
        v_chunk || to_jsonb(reprise.exact_text(p))::text, true);
    PERFORM set_config('reprise.captured_n', (v_count + 1)::text, true);
    RETURN p;
END
$fn$;

-- Which of 256 settings keeps the values captured by row for a key.
CREATE OR REPLACE FUNCTION reprise.key_bucket(p_key text)
RETURNS integer LANGUAGE sql IMMUTABLE AS $fn$
    SELECT pg_catalog.hashtext(p_key) & 255
$fn$;

-- On replay, the first call splits the entry's record (one setting) into
-- the chunks and buckets the calls read: the ordered values in chunks of
-- 100 (reprise.replay_<k>), those captured by row in 256 buckets by key
-- (reprise.replay_k<b>). Returns how many ordered values were recorded.
CREATE OR REPLACE FUNCTION reprise.replay_split()
RETURNS integer LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_done text := current_setting('reprise.replay_count', true);
    v_all jsonb;
    v_keyed jsonb;
    r record;
BEGIN
    IF coalesce(v_done, '') <> '' THEN
        RETURN v_done::integer;
    END IF;
    v_all := current_setting('reprise.replay_values')::jsonb;
    IF jsonb_typeof(v_all) = 'object' THEN
        v_keyed := v_all -> 'keyed';
        v_all := coalesce(v_all -> 'values', '[]');
    END IF;
    FOR r IN SELECT (e.o - 1) / 100 AS k, jsonb_agg(e.v ORDER BY e.o) AS chunk
             FROM jsonb_array_elements(v_all) WITH ORDINALITY AS e(v, o) GROUP BY 1 LOOP
        PERFORM set_config('reprise.replay_' || r.k, r.chunk::text, true);
    END LOOP;
    FOR r IN SELECT reprise.key_bucket(e.key) AS b, jsonb_object_agg(e.key, e.value) AS m
             FROM jsonb_each(coalesce(v_keyed, '{}')) AS e GROUP BY 1 LOOP
        PERFORM set_config('reprise.replay_k' || r.b, r.m::text, true);
    END LOOP;
    PERFORM set_config('reprise.replay_count', jsonb_array_length(v_all)::text, true);
    RETURN jsonb_array_length(v_all);
END
$fn$;

-- Row capture in an UPDATE of several rows: the value is recorded under
-- its row's key (p_key: table and key columns), so replay finds it
-- whatever order that copy visits the rows in. The n-th value computed
-- for a key is the n-th returned for it. Kept in 256 settings by key, for
-- the reason given at reprise.captured.
CREATE OR REPLACE FUNCTION reprise.captured_keyed(p anyelement, p_key text)
RETURNS anyelement LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_bucket integer := reprise.key_bucket(p_key);
    v_seen jsonb;
    v_n integer;
    v_value jsonb;
    v_map jsonb;
BEGIN
    IF coalesce(current_setting('reprise.replay_pos', true), '') <> '' THEN
        PERFORM reprise.replay_split();
        v_seen := coalesce(nullif(current_setting('reprise.replay_seen' || v_bucket, true), ''),
                           '{}')::jsonb;
        v_n := coalesce((v_seen ->> p_key)::integer, 0);
        v_value := coalesce(nullif(current_setting('reprise.replay_k' || v_bucket, true), ''),
                            '{}')::jsonb -> p_key -> v_n;
        IF v_value IS NULL THEN
            -- As in reprise.captured: a part rolled back to a savepoint.
            PERFORM set_config('reprise.replay_unrecorded',
                format('the entry recorded no captured value %s for row %s', v_n + 1, p_key), true);
            RETURN p;
        END IF;
        PERFORM set_config('reprise.replay_seen' || v_bucket,
            jsonb_set(v_seen, ARRAY[p_key], to_jsonb(v_n + 1))::text, true);
        RETURN reprise.from_exact_text(v_value #>> '{}', p);
    END IF;
    v_map := coalesce(nullif(current_setting('reprise.captured_k' || v_bucket, true), ''),
                      '{}')::jsonb;
    v_map := jsonb_set(v_map, ARRAY[p_key],
        coalesce(v_map -> p_key, '[]') || jsonb_build_array(reprise.exact_text(p)));
    PERFORM set_config('reprise.captured_k' || v_bucket, v_map::text, true);
    PERFORM set_config('reprise.captured_keyed', 'yes', true);
    RETURN p;
END
$fn$;

-- Run by the applier at the end of an entry with captured values: a value
-- the entry did not record, asked for outside a part rolled back to a
-- savepoint, means this copy replayed the entry differently.
CREATE OR REPLACE FUNCTION reprise.replay_check()
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    v_unrecorded text := current_setting('reprise.replay_unrecorded', true);
BEGIN
    IF coalesce(v_unrecorded, '') <> '' THEN
        RAISE EXCEPTION 'reprise: %', v_unrecorded USING ERRCODE = 'XX000';
    END IF;
END
$fn$;

-- What the transaction captured, as logged with its entry: the ordered
-- values (a JSON array), or {"values": […], "keyed": {key: […]}} when
-- some were captured by row.
CREATE OR REPLACE FUNCTION reprise.captures()
RETURNS text LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_count integer := coalesce(nullif(current_setting('reprise.captured_n', true), ''), '0')::integer;
    v_values jsonb := '[]';
BEGIN
    IF v_count > 0 THEN
        SELECT ('[' || string_agg(current_setting('reprise.captured_' || k), ',' ORDER BY k) || ']')::jsonb
          INTO v_values FROM generate_series(0, (v_count - 1) / 100) AS k;
    END IF;
    IF coalesce(current_setting('reprise.captured_keyed', true), '') <> '' THEN
        RETURN jsonb_build_object('values', v_values, 'keyed',
            (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}')
             FROM generate_series(0, 255) AS b,
                  jsonb_each(coalesce(nullif(current_setting('reprise.captured_k' || b, true), ''),
                                      '{}')::jsonb) AS e))::text;
    END IF;
    RETURN CASE WHEN v_count > 0 THEN v_values::text END;
END
$fn$;

-- The role this connection logged in as, which the statistics system
-- keeps (SET SESSION AUTHORIZATION changes session_user, not this).
CREATE OR REPLACE FUNCTION reprise.login_role()
RETURNS oid LANGUAGE sql STABLE AS $fn$
    SELECT a.usesysid FROM pg_catalog.pg_stat_activity a
    WHERE a.pid = pg_catalog.pg_backend_pid()
$fn$;

-- Whether this connection may write the log: whether it logged in as a
-- member of the current user (in the SECURITY DEFINER functions below:
-- their owner, the proxy's own user). session_user tells until a SET
-- SESSION AUTHORIZATION, which the proxy's user (a superuser) may run for
-- a client and replay; then the login role is looked up. One expression,
-- names qualified, no SET clause: it is inlined where it is called, as
-- cheap as the first test written out.
CREATE OR REPLACE FUNCTION reprise.is_log_writer()
RETURNS boolean LANGUAGE sql STABLE AS $fn$
    SELECT pg_catalog.pg_has_role(session_user, current_user, 'MEMBER')
        OR coalesce(pg_catalog.pg_has_role(reprise.login_role(), current_user, 'MEMBER'), false)
$fn$;

-- Appends an entry on the primary inside the writing transaction. The
-- caller holds the group's write lock, so seq order is commit order; a
-- caller holding it only shared (row-local writes) passes the key of the
-- commit-order lock, taken here and held through COMMIT, so that the lock
-- costs no statement of its own.
-- Refuses entries of another term (fencing a stale primary).
-- Returns the row as appliers read it, so that the proxy can hand it to
-- its own appliers once the transaction committed.
CREATE OR REPLACE FUNCTION reprise.append_row(p_term bigint, p_payload bytea, p_seqs_before text,
                                              p_order_key bigint)
RETURNS TABLE (r_seq bigint, r_prev_hash text, r_hash text, r_sequences text,
               r_captured text, r_committed_us bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_term bigint;
    v_after text;
BEGIN
    -- Another role can call this (see the GRANT at the end) but not use it.
    IF NOT reprise.is_log_writer() THEN
        RAISE EXCEPTION 'reprise: only the proxy''s own user writes the log'
            USING ERRCODE = '42501';
    END IF;
    IF p_order_key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(p_order_key);
    END IF;
    SELECT term INTO v_term FROM reprise.node;
    IF v_term IS DISTINCT FROM p_term THEN
        RAISE EXCEPTION 'reprise: this node is at term %, the entry is of term %', v_term, p_term
            USING ERRCODE = '40P02', HINT = 'a newer primary exists; retry the transaction';
    END IF;
    SELECT l.seq, l.hash INTO r_seq, r_prev_hash FROM reprise.log l ORDER BY l.seq DESC LIMIT 1;
    r_seq := coalesce(r_seq, 0) + 1;
    r_prev_hash := coalesce(r_prev_hash, '');
    -- Row-local transactions (no snapshot passed) never touch sequences.
    IF p_seqs_before IS NOT NULL THEN
        v_after := reprise.sequences();
    END IF;
    r_captured := reprise.captures();
    -- The hash covers what replay uses: the previous hash, the payload and
    -- the values captured on the primary.
    r_hash := encode(sha256(convert_to(r_prev_hash, 'UTF8') || p_payload
                            || convert_to(coalesce(r_captured, ''), 'UTF8')), 'hex');
    r_sequences := CASE WHEN p_seqs_before IS NULL OR v_after = p_seqs_before THEN NULL
                        ELSE '[' || coalesce(p_seqs_before, '[]') || ',' || v_after || ']' END;
    INSERT INTO reprise.log AS l (seq, term, payload, prev_hash, hash, sequences, captured)
    VALUES (r_seq, p_term, p_payload, r_prev_hash, r_hash, r_sequences, r_captured)
    RETURNING (extract(epoch FROM l.committed_at) * 1000000)::bigint INTO r_committed_us;
    PERFORM pg_notify('reprise_log', r_seq::text);
    RETURN NEXT;
END
$fn$;

-- The append as earlier versions called it: the seq only.
CREATE OR REPLACE FUNCTION reprise.append(p_term bigint, p_payload bytea, p_seqs_before text,
                                          p_order_key bigint)
RETURNS bigint LANGUAGE sql AS $fn$
    SELECT r_seq FROM reprise.append_row(p_term, p_payload, p_seqs_before, p_order_key)
$fn$;

-- The append of callers holding the write lock exclusively.
CREATE OR REPLACE FUNCTION reprise.append(p_term bigint, p_payload bytea, p_seqs_before text)
RETURNS bigint LANGUAGE sql AS $fn$
    SELECT reprise.append(p_term, p_payload, p_seqs_before, NULL::bigint)
$fn$;

-- Records an entry replayed on a subscriber, in the replaying transaction:
-- exactly once (primary key) and only right after the previous one.
CREATE OR REPLACE FUNCTION reprise.applied(p_seq bigint, p_term bigint, p_payload bytea,
                                           p_prev_hash text, p_hash text, p_sequences text,
                                           p_committed_at timestamptz, p_captured text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_seq bigint;
    v_prev text;
BEGIN
    -- Another role can call this (see the GRANT at the end) but not use it.
    IF NOT reprise.is_log_writer() THEN
        RAISE EXCEPTION 'reprise: only the proxy''s own user writes the log'
            USING ERRCODE = '42501';
    END IF;
    SELECT seq, hash INTO v_seq, v_prev FROM reprise.log ORDER BY seq DESC LIMIT 1;
    -- Another applier (another proxy) may be replaying the same log: a
    -- position mismatch is not a divergence, a history mismatch is.
    IF coalesce(v_seq, 0) + 1 <> p_seq THEN
        RAISE EXCEPTION 'reprise: entry % does not follow this node''s log (at seq %)', p_seq, coalesce(v_seq, 0)
            USING ERRCODE = '40P03';
    END IF;
    IF coalesce(v_prev, '') <> p_prev_hash THEN
        RAISE EXCEPTION 'reprise: entry % continues another history than this node''s (hash % here, % in the entry)',
            p_seq, coalesce(v_prev, ''), p_prev_hash
            USING ERRCODE = '40P04';
    END IF;
    INSERT INTO reprise.log (seq, term, payload, prev_hash, hash, sequences, committed_at, captured)
    VALUES (p_seq, p_term, p_payload, p_prev_hash, p_hash, p_sequences, p_committed_at, p_captured);
END
$fn$;

-- The form of earlier versions (no captured values).
CREATE OR REPLACE FUNCTION reprise.applied(p_seq bigint, p_term bigint, p_payload bytea,
                                           p_prev_hash text, p_hash text, p_sequences text,
                                           p_committed_at timestamptz)
RETURNS void LANGUAGE sql AS $fn$
    SELECT reprise.applied(p_seq, p_term, p_payload, p_prev_hash, p_hash, p_sequences,
                           p_committed_at, NULL::text)
$fn$;

-- The value the next nextval of a sequence not called since its creation
-- or last RESTART / setval(…, false) returns (pg_sequences shows NULL).
CREATE OR REPLACE FUNCTION reprise.sequence_next(p_schema name, p_name name)
RETURNS bigint LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v bigint;
BEGIN
    EXECUTE format('SELECT last_value FROM %I.%I', p_schema, p_name) INTO v;
    RETURN v;
END
$fn$;

-- Sequence states, to make replayed nextval calls give the same numbers:
-- [name, last value (NULL if not called), the value a replay sets with
-- is_called = false when it is NULL: where nextval starts, after a
-- RESTART WITH too].
CREATE OR REPLACE FUNCTION reprise.sequences()
RETURNS text LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(json_agg(json_build_array(format('%I.%I', schemaname, sequencename),
                                              last_value,
                                              CASE WHEN last_value IS NULL
                                                   THEN reprise.sequence_next(schemaname, sequencename)
                                                   ELSE start_value END)
                             ORDER BY schemaname, sequencename)::text, '[]')
    FROM pg_sequences
    WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'reprise')
      AND reprise.is_log_writer()
$fn$;

-- VERIFY: per-table row counts and checksums, computed by every node
-- when it reaches the same log entry (the entry calls
-- reprise.checksum_tables), so the copies are compared at one position.
CREATE TABLE IF NOT EXISTS reprise.checksum (
    verify_id bigint NOT NULL,
    tbl text NOT NULL,
    row_count bigint NOT NULL,
    checksum text NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (verify_id, tbl)
);

-- The checksum of a table is the sum of the first 60 bits of each row's
-- md5 (of its text form under fixed output settings): independent of row
-- order and physical layout, sensitive to any changed value.
CREATE OR REPLACE FUNCTION reprise.checksum_tables(p_verify bigint)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    v_rows bigint;
    v_sum text;
    v_tables bigint := 0;
BEGIN
    PERFORM set_config('TimeZone', 'UTC', true);
    PERFORM set_config('DateStyle', 'ISO, YMD', true);
    PERFORM set_config('IntervalStyle', 'postgres', true);
    PERFORM set_config('extra_float_digits', '1', true);
    PERFORM set_config('bytea_output', 'hex', true);
    DELETE FROM reprise.checksum WHERE computed_at < clock_timestamp() - interval '1 day';
    FOR r IN
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence = 'p'
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'reprise')
          AND n.nspname NOT LIKE 'pg\_%'
        ORDER BY 1, 2
    LOOP
        EXECUTE format(
            'SELECT count(*), coalesce(sum((''x'' || substr(md5(t::text), 1, 15))::bit(60)::bigint::numeric), 0)::text FROM ONLY %I.%I t',
            r.nspname, r.relname)
        INTO v_rows, v_sum;
        INSERT INTO reprise.checksum (verify_id, tbl, row_count, checksum)
        VALUES (p_verify, format('%I.%I', r.nspname, r.relname), v_rows, v_sum);
        v_tables := v_tables + 1;
    END LOOP;
    RETURN v_tables;
END
$fn$;

-- A client session may SET ROLE to a role without rights here; its writes
-- still call the functions above (the capture rewrites call
-- reprise.captured(), the lock query reprise.sequences(), the commit
-- reprise.append_row()), and the replay runs as that role too. Those that
-- read or write this schema's tables run as their owner, for sessions
-- logged in as the proxy's own user only.
GRANT USAGE ON SCHEMA reprise TO PUBLIC;

INSERT INTO reprise.node (schema_version) VALUES (1) ON CONFLICT DO NOTHING;
