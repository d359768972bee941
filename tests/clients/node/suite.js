'use strict'
// node-postgres compatibility suite (see ../README.md for the contract).
// One JSON line per feature on stdout; everything else on stderr.

const net = require('net')
const { Readable, Writable } = require('stream')
const { pipeline } = require('stream/promises')
const pg = require('pg')
const Cursor = require('pg-cursor')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

const APP = 'compat-node'
const FEATURE_TIMEOUT_MS = 8000

const open = [] // every client opened, closed (or destroyed) at the end
let c = null // the suite's main connection; replaced after a failed feature

function emit(feature, ok, detail) {
  process.stdout.write(JSON.stringify({ feature, ok: !!ok, detail: String(detail).slice(0, 300) }) + '\n')
}

function log(...args) {
  console.error('[node-suite]', ...args)
}

async function connect() {
  const client = new pg.Client({ application_name: APP, connectionTimeoutMillis: 5000 })
  client.on('error', (e) => log('client error:', e.message))
  open.push(client)
  await client.connect()
  return client
}

function destroy(client) {
  try {
    if (client.connection && client.connection.stream) client.connection.stream.destroy()
  } catch (e) {
    /* ignore */
  }
}

async function closeAll() {
  await Promise.all(
    open.map(async (c) => {
      const t = setTimeout(() => destroy(c), 1000)
      try {
        await c.end()
      } catch (e) {
        destroy(c)
      } finally {
        clearTimeout(t)
      }
    })
  )
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms))
}

class Check extends Error {}

function check(cond, msg) {
  if (!cond) throw new Check(msg)
}

function eq(actual, expected, what) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  if (a !== e) throw new Check(`${what}: got ${a}, want ${e}`)
}

// Runs one feature with a bound on its duration; every client it opened is
// destroyed if it overruns, so a stuck query cannot hang the suite.
async function feature(name, fn) {
  const before = open.length
  let timer
  const started = Date.now()
  try {
    const detail = await Promise.race([
      fn(),
      new Promise((_, rej) => {
        timer = setTimeout(() => rej(new Check(`timed out after ${FEATURE_TIMEOUT_MS} ms`)), FEATURE_TIMEOUT_MS)
      }),
    ])
    emit(name, true, detail || 'ok')
  } catch (e) {
    const msg = e instanceof Check ? e.message : `${e.code ? e.code + ' ' : ''}${e.message}`
    log(`${name} failed:`, e instanceof Check ? e.message : e.stack || e)
    emit(name, false, msg)
    // Whatever the failure left behind (a stuck query, an open transaction)
    // must not leak into the next feature: fresh connections.
    for (const x of open.slice(before)) destroy(x)
    destroy(c)
    try {
      c = await connect()
    } catch (e2) {
      log('reconnect failed:', e2.message)
    }
  } finally {
    clearTimeout(timer)
    log(`${name}: ${Date.now() - started} ms`)
  }
}

async function expectError(promise, code, what) {
  try {
    await promise
  } catch (e) {
    if (e.code === code) return e
    throw new Check(`${what}: expected SQLSTATE ${code}, got ${e.code} ${e.message}`)
  }
  throw new Check(`${what}: expected SQLSTATE ${code}, but it succeeded`)
}

// A CancelRequest on a new socket, exactly as libpq sends it:
// Int32 16, Int32 80877102, Int32 backend pid, Int32 secret key.
function sendCancel(client) {
  return new Promise((resolve, reject) => {
    const host = client.host || process.env.PGHOST || '127.0.0.1'
    const port = Number(client.port || process.env.PGPORT || 5432)
    const opts = host.startsWith('/') ? { path: `${host}/.s.PGSQL.${port}` } : { host, port }
    const buf = Buffer.alloc(16)
    buf.writeInt32BE(16, 0)
    buf.writeInt32BE(80877102, 4)
    const put = (v, off) => (v < 0 ? buf.writeInt32BE(v, off) : buf.writeUInt32BE(v >>> 0, off))
    put(client.processID, 8)
    put(client.secretKey, 12)
    const sock = net.connect(opts)
    const timer = setTimeout(() => {
      sock.destroy()
      reject(new Error('cancel socket timed out'))
    }, 3000)
    sock.on('connect', () => sock.write(buf))
    // The server closes the connection after reading the request.
    sock.on('close', () => {
      clearTimeout(timer)
      resolve()
    })
    sock.on('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
  })
}

async function main() {
  c = await connect()

  await feature('routing', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_reads')
    await c.query('DROP TABLE IF EXISTS compat_node_writes')
    await c.query('CREATE TABLE compat_node_reads (id int primary key, v text)')
    await c.query('CREATE TABLE compat_node_writes (id int primary key, v text)')
    await c.query("INSERT INTO compat_node_reads SELECT g, 'r' || g FROM generate_series(1, 10) g")
    await sleep(1000)
    for (let i = 0; i < 20; i++) {
      const id = (i % 10) + 1
      const r = await c.query('SELECT v FROM compat_node_reads WHERE id = $1', [id])
      eq(r.rows, [{ v: 'r' + id }], `read ${i}`)
    }
    for (let i = 1; i <= 5; i++) {
      const r = await c.query('INSERT INTO compat_node_writes (id, v) VALUES ($1, $2)', [i, 'w' + i])
      eq(r.rowCount, 1, `insert ${i} rowCount`)
    }
    return '20 reads, 5 writes'
  })

  await feature('read_own_write', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_row')
    await c.query('CREATE TABLE compat_node_row (id int primary key, v text)')
    for (let i = 1; i <= 5; i++) {
      await c.query('INSERT INTO compat_node_row VALUES ($1, $2)', [i, 'own' + i])
      const r = await c.query('SELECT v FROM compat_node_row WHERE id = $1', [i])
      eq(r.rows, [{ v: 'own' + i }], `select after insert ${i}`)
      const s = await c.query(`SELECT v FROM compat_node_row WHERE id = ${i}`)
      eq(s.rows, [{ v: 'own' + i }], `simple select after insert ${i}`)
    }
    return '5 insert+select pairs'
  })

  await feature('error_recovery', async () => {
    await expectError(c.query('SELECT * FROM compat_node_missing'), '42P01', 'simple query')
    eq((await c.query('SELECT 1 AS x')).rows, [{ x: 1 }], 'after simple error')
    await expectError(c.query('SELECT * FROM compat_node_missing WHERE id = $1', [1]), '42P01', 'extended query')
    eq((await c.query('SELECT $1::int AS x', [2])).rows, [{ x: 2 }], 'after extended error')
    await c.query('BEGIN')
    await expectError(c.query('SELECT * FROM compat_node_missing'), '42P01', 'in transaction')
    await expectError(c.query('SELECT 1'), '25P02', 'aborted transaction')
    await c.query('ROLLBACK')
    await c.query('BEGIN')
    eq((await c.query('SELECT 3 AS x')).rows, [{ x: 3 }], 'next transaction')
    await c.query('COMMIT')
    return '42P01 outside and inside a transaction, recovered'
  })

  await feature('cancel', async () => {
    const k = await connect()
    const started = Date.now()
    // Handle the outcome at once: the error may arrive before the cancel
    // socket closes.
    const q = expectError(k.query('SELECT pg_sleep(10)'), '57014', 'cancelled pg_sleep')
    q.catch(() => {})
    await sleep(500)
    await sendCancel(k)
    const err = await q
    const took = Date.now() - started
    check(took < 5000, `cancel took ${took} ms`)
    eq((await k.query('SELECT 1 AS x')).rows, [{ x: 1 }], 'after cancel')
    await k.end()
    return `57014 after ${took} ms (${err.message})`
  })

  await feature('transaction', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_tx')
    await c.query('CREATE TABLE compat_node_tx (id int primary key, v text)')
    await c.query('BEGIN')
    await c.query('INSERT INTO compat_node_tx VALUES ($1, $2)', [1, 'a'])
    await c.query("INSERT INTO compat_node_tx VALUES (2, 'b')")
    await c.query('COMMIT')
    await c.query('BEGIN')
    await c.query('INSERT INTO compat_node_tx VALUES ($1, $2)', [3, 'c'])
    eq((await c.query('SELECT count(*)::int AS n FROM compat_node_tx')).rows, [{ n: 3 }], 'inside rolled-back tx')
    await c.query('ROLLBACK')
    const r = await c.query('SELECT id, v FROM compat_node_tx ORDER BY id')
    eq(r.rows, [{ id: 1, v: 'a' }, { id: 2, v: 'b' }], 'rows after commit+rollback')
    return 'committed rows only'
  })

  await feature('parameterised_query', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_params')
    await c.query('CREATE TABLE compat_node_params (id int primary key, v text, n int)')
    const r = await c.query('SELECT $1::int + $2::int AS s, $3::text AS t, $4::text IS NULL AS isnull', [
      40,
      2,
      "it's \"quoted\" ü",
      null,
    ])
    eq(r.rows, [{ s: 42, t: "it's \"quoted\" ü", isnull: true }], 'select with params')
    for (let i = 1; i <= 5; i++) {
      await c.query('INSERT INTO compat_node_params (id, v, n) VALUES ($1, $2, $3)', [i, `v'${i}`, i === 3 ? null : i * 10])
    }
    const u = await c.query('UPDATE compat_node_params SET n = n + $1 WHERE id = $2', [1, 2])
    eq(u.rowCount, 1, 'update rowCount')
    const s = await c.query('SELECT id, v, n FROM compat_node_params WHERE id >= $1 ORDER BY id', [2])
    eq(
      s.rows,
      [
        { id: 2, v: "v'2", n: 21 },
        { id: 3, v: "v'3", n: null },
        { id: 4, v: "v'4", n: 40 },
        { id: 5, v: "v'5", n: 50 },
      ],
      'rows'
    )
    return 'select, insert, update with $n params'
  })

  await feature('named_statement', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_named')
    await c.query('CREATE TABLE compat_node_named (id int primary key, v text)')
    for (let i = 1; i <= 5; i++) {
      const r = await c.query({
        name: 'compat_node_ins',
        text: 'INSERT INTO compat_node_named (id, v) VALUES ($1, $2)',
        values: [i, 'n' + i],
      })
      eq(r.rowCount, 1, `named insert ${i}`)
    }
    for (let i = 5; i >= 1; i--) {
      const r = await c.query({ name: 'compat_node_sel', text: 'SELECT v FROM compat_node_named WHERE id = $1', values: [i] })
      eq(r.rows, [{ v: 'n' + i }], `named select ${i}`)
    }
    // The same named statements inside a transaction.
    await c.query('BEGIN')
    await c.query({ name: 'compat_node_ins', text: 'INSERT INTO compat_node_named (id, v) VALUES ($1, $2)', values: [6, 'n6'] })
    const r = await c.query({ name: 'compat_node_sel', text: 'SELECT v FROM compat_node_named WHERE id = $1', values: [6] })
    eq(r.rows, [{ v: 'n6' }], 'named select in transaction')
    await c.query('COMMIT')
    const n = await c.query('SELECT count(*)::int AS n FROM compat_node_named')
    eq(n.rows, [{ n: 6 }], 'count')
    return '6 named inserts, 6 named selects'
  })

  await feature('cursor', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_cursor')
    await c.query('CREATE TABLE compat_node_cursor (id int primary key, v text)')
    await c.query("INSERT INTO compat_node_cursor SELECT g, 'c' || g FROM generate_series(1, 1000) g")
    await c.query('BEGIN')
    const cur = c.query(new Cursor('SELECT id, v FROM compat_node_cursor WHERE id >= $1 ORDER BY id', [1]))
    let total = 0
    let batches = 0
    let expected = 1
    for (;;) {
      const rows = await cur.read(100)
      if (rows.length === 0) break
      batches++
      check(rows.length === 100, `batch ${batches} has ${rows.length} rows`)
      for (const row of rows) {
        check(row.id === expected && row.v === 'c' + expected, `row ${expected}: ${JSON.stringify(row)}`)
        expected++
      }
      total += rows.length
    }
    await cur.close()
    await c.query('COMMIT')
    eq(total, 1000, 'rows read')
    eq(batches, 10, 'batches')
    eq((await c.query('SELECT 1 AS x')).rows, [{ x: 1 }], 'after cursor')
    return '1000 rows in 10 batches of 100'
  })

  const copyRows = []
  for (let i = 1; i <= 1000; i++) copyRows.push(`${i}\tcopy ${i} \\\\ tab\\tend\n`)
  const copyText = copyRows.join('')

  await feature('copy_from', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_copy')
    await c.query('CREATE TABLE compat_node_copy (id int primary key, v text)')
    const stream = c.query(copyFrom('COPY compat_node_copy (id, v) FROM STDIN'))
    // Send in uneven chunks, as a real producer would.
    const chunks = []
    for (let i = 0; i < copyText.length; i += 4093) chunks.push(copyText.slice(i, i + 4093))
    await pipeline(Readable.from(chunks), stream)
    eq(stream.rowCount, 1000, 'COPY rowCount')
    const r = await c.query("SELECT count(*)::int AS n, sum(id)::int AS s, max(v) FILTER (WHERE id = 7) AS v FROM compat_node_copy")
    eq(r.rows, [{ n: 1000, s: 500500, v: 'copy 7 \\ tab\tend' }], 'table after COPY')
    return '1000 rows copied in'
  })

  await feature('copy_to', async () => {
    const parts = []
    const stream = c.query(copyTo('COPY (SELECT id, v FROM compat_node_copy ORDER BY id) TO STDOUT'))
    await pipeline(
      stream,
      new Writable({
        write(chunk, _enc, cb) {
          parts.push(chunk)
          cb()
        },
      })
    )
    const out = Buffer.concat(parts).toString('utf8')
    check(out === copyText, `COPY TO output differs (${out.length} vs ${copyText.length} chars)`)
    eq((await c.query('SELECT 1 AS x')).rows, [{ x: 1 }], 'after COPY TO')
    return '1000 rows copied out, identical'
  })

  await feature('types', async () => {
    await c.query('DROP TABLE IF EXISTS compat_node_types')
    await c.query(
      'CREATE TABLE compat_node_types (id int primary key, j jsonb, ia int[], ta text[], b bytea, n numeric, ts timestamptz)'
    )
    const json = { a: 1, b: [true, null, 'x "y" ü'], c: { d: 1.5 } }
    const ia = [1, -2, 3]
    const ta = ['a', 'b,c', 'd "e"', null]
    const bytes = Buffer.alloc(256)
    for (let i = 0; i < 256; i++) bytes[i] = i
    const num = '12345678901234567890.123456789012'
    const ts = new Date(Date.UTC(2024, 1, 29, 12, 34, 56, 789))
    await c.query('INSERT INTO compat_node_types VALUES ($1, $2, $3, $4, $5, $6, $7)', [
      1,
      json,
      ia,
      ta,
      bytes,
      num,
      ts,
    ])
    const r = await c.query('SELECT j, ia, ta, b, n, ts FROM compat_node_types WHERE id = $1', [1])
    eq(r.rows.length, 1, 'row count')
    const row = r.rows[0]
    eq(row.j, json, 'jsonb')
    eq(row.ia, ia, 'int[]')
    eq(row.ta, ta, 'text[]')
    check(Buffer.isBuffer(row.b) && row.b.equals(bytes), 'bytea differs')
    eq(row.n, num, 'numeric (as string)')
    check(row.ts instanceof Date && row.ts.getTime() === ts.getTime(), `timestamptz: ${row.ts}`)
    // Server-side operations on the stored values.
    const q = await c.query(
      "SELECT j->'c'->>'d' AS d, ia[2] AS i2, array_length(ta, 1) AS tl, length(b) AS bl, n * 2 AS n2, ts = $2::timestamptz AS tseq FROM compat_node_types WHERE id = $1",
      [1, ts.toISOString()]
    )
    eq(q.rows, [{ d: '1.5', i2: -2, tl: 4, bl: 256, n2: '24691357802469135780.246913578024', tseq: true }], 'server-side')
    // Parameters round-tripped without a table.
    const p = await c.query('SELECT $1::jsonb AS j, $2::numeric AS n, $3::bytea AS b', [json, num, bytes])
    eq(p.rows[0].j, json, 'jsonb param')
    eq(p.rows[0].n, num, 'numeric param')
    check(p.rows[0].b.equals(bytes), 'bytea param')
    return 'jsonb, int[], text[], bytea, numeric, timestamptz'
  })
}

// A feature abandoned after its time ran out may still reject later.
process.on('unhandledRejection', (e) => log('late rejection:', e && e.message))

const watchdog = setTimeout(() => {
  log('suite watchdog: giving up after 60 s')
  process.exit(2)
}, 60000)

main()
  .then(async () => {
    await closeAll()
    clearTimeout(watchdog)
    process.exit(0)
  })
  .catch((e) => {
    log('suite crashed:', e.stack || e)
    process.exit(1)
  })
