'use strict';
/**
 * A small client for nosq wire protocol v1 (docs/protocol.md), for Node.js 20+.
 *
 *   // inside an async function:
 *   const { createClient } = require('redis');
 *   const nosq = require('./nosq');
 *   const client = await createClient({ url: 'redis://127.0.0.1:6379/0' }).connect();
 *   const x = nosq.encodeTensor('float32', [2, 3], Float32Array.of(0, 1, 2, 3, 4, 5));
 *   const id = await nosq.enqueue(client, 'noop', { x }, { ct: 'msgpack', timeoutMs: 5000 });
 *   const envelope = await nosq.waitResult(client, id, 'msgpack', 5); // BLPOP on its own connection
 *   if (envelope.ok) console.log(envelope.out.x.toTypedArray());
 *
 * Tensors decode to `Tensor` objects (dtype, shape, little-endian bytes). Nothing here is
 * specific to one model: inputs are any msgpack/JSON value with tensors inside. A model served
 * on several request streams (`partitions = N` in its spec) is followed: see `partitionTags`.
 */

const crypto = require('node:crypto');
const os = require('node:os');
const zlib = require('node:zlib');
const msgpack = require('@msgpack/msgpack');
const { RESP_TYPES } = require('redis');

const PROTOCOL_VERSION = 1;
const DEFAULT_TTL_S = 600;
const MAX_TTL_S = 7 * 24 * 3600;
const MAX_DIMS = 32;
const CONTENT_TYPES = Object.freeze(['msgpack', 'json']);
const REQUEST_ID_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
const MODEL_ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const LITTLE_ENDIAN_HOST = os.endianness() === 'LE';
const PARTITIONS_TTL_S = 5; // how long a client trusts the partition tags it read (as Python's)

/**
 * The key names, exactly as producer/keys.py builds them. The model keys take a model id or,
 * for one partition of a partitioned model, that partition's tag (`mlp~4`).
 */
const keys = Object.freeze({
  requests: (tag) => `nosq:{${tag}}:req`,
  deadLetters: (model) => `nosq:{${model}}:dlq`,
  admission: (tag) => `nosq:{${tag}}:admission`,
  result: (id) => `nosq:res:{${id}}`,
  done: (id) => `nosq:done:{${id}}`,
  cancel: (id) => `nosq:cancel:{${id}}`,
  reply: (client) => `nosq:reply:{${client}}`,
});

/** XADD unless the model's published backlog limit is reached (producer/enqueue.py ENQUEUE_LUA). */
const ENQUEUE_LUA = `
local limit = redis.call('HGET', KEYS[2], 'max_backlog')
if limit then
  local depth = redis.call('XLEN', KEYS[1])
  if depth >= tonumber(limit) then
    return {0, depth, redis.call('HGET', KEYS[2], 'retry_after_ms') or false}
  end
end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV))}
`;
const ENQUEUE_SHA = crypto.createHash('sha1').update(ENQUEUE_LUA).digest('hex');

// dtype -> [bytes per element, scalar kind, scalars per element, typed array for toTypedArray()]
const DTYPES = Object.freeze({
  bool: [1, 'bool', 1, Uint8Array],
  uint8: [1, 'uint8', 1, Uint8Array],
  int8: [1, 'int8', 1, Int8Array],
  uint16: [2, 'uint16', 1, Uint16Array],
  int16: [2, 'int16', 1, Int16Array],
  uint32: [4, 'uint32', 1, Uint32Array],
  int32: [4, 'int32', 1, Int32Array],
  uint64: [8, 'uint64', 1, BigUint64Array],
  int64: [8, 'int64', 1, BigInt64Array],
  float16: [2, 'float16', 1, Float32Array],
  float32: [4, 'float32', 1, Float32Array],
  float64: [8, 'float64', 1, Float64Array],
  complex64: [8, 'float32', 2, Float32Array], // (real, imag) float32 pairs
  complex128: [16, 'float64', 2, Float64Array], // (real, imag) float64 pairs
});

// scalar kind -> [bytes, write(view, offset, value), read(view, offset)]; always little-endian
const SCALARS = {
  bool: [1, (v, o, x) => v.setUint8(o, x ? 1 : 0), (v, o) => v.getUint8(o)],
  uint8: [1, (v, o, x) => v.setUint8(o, x), (v, o) => v.getUint8(o)],
  int8: [1, (v, o, x) => v.setInt8(o, x), (v, o) => v.getInt8(o)],
  uint16: [2, (v, o, x) => v.setUint16(o, x, true), (v, o) => v.getUint16(o, true)],
  int16: [2, (v, o, x) => v.setInt16(o, x, true), (v, o) => v.getInt16(o, true)],
  uint32: [4, (v, o, x) => v.setUint32(o, x, true), (v, o) => v.getUint32(o, true)],
  int32: [4, (v, o, x) => v.setInt32(o, x, true), (v, o) => v.getInt32(o, true)],
  uint64: [8, (v, o, x) => v.setBigUint64(o, BigInt(x), true), (v, o) => v.getBigUint64(o, true)],
  int64: [8, (v, o, x) => v.setBigInt64(o, BigInt(x), true), (v, o) => v.getBigInt64(o, true)],
  float16: [2, (v, o, x) => v.setUint16(o, toHalfBits(x), true), (v, o) => fromHalfBits(v.getUint16(o, true))],
  float32: [4, (v, o, x) => v.setFloat32(o, x, true), (v, o) => v.getFloat32(o, true)],
  float64: [8, (v, o, x) => v.setFloat64(o, x, true), (v, o) => v.getFloat64(o, true)],
};

class NosqError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** Data that does not follow wire protocol v1. */
class ProtocolError extends NosqError {}

/** The model's backlog limit is reached; retry after `retryAfterMs` (may be null). */
class QueueFullError extends NosqError {
  constructor(model, backlog, retryAfterMs) {
    const hint = retryAfterMs == null ? '' : `; retry after ${retryAfterMs} ms`;
    super(`queue for model '${model}' is full (${backlog} waiting)${hint}`);
    this.model = model;
    this.backlog = backlog;
    this.retryAfterMs = retryAfterMs;
  }
}

/** No result within the caller's timeout. */
class NosqTimeoutError extends NosqError {
  constructor(id, timeoutS) {
    super(`no result for request '${id}' within ${timeoutS} s: is a manager serving this model?`);
    this.id = id;
    this.timeoutS = timeoutS;
  }
}

/** A tensor as it travels: dtype name, shape, and its elements' little-endian bytes in C order. */
class Tensor {
  constructor(dtype, shape, data) {
    checkDtypeShape(dtype, shape);
    const expected = elementCount(shape) * DTYPES[dtype][0];
    if (!(data instanceof Uint8Array) || data.byteLength !== expected) {
      const got = data instanceof Uint8Array ? `${data.byteLength} bytes` : typeof data;
      throw new ProtocolError(`tensor of dtype ${dtype} and shape [${shape}] needs ${expected} bytes, got ${got}`);
    }
    this.dtype = dtype;
    this.shape = shape.slice();
    this.data = data;
  }

  get size() {
    return elementCount(this.shape);
  }

  /**
   * The elements in C order as a typed array: float16 widens to Float32Array, bool gives 0/1
   * in a Uint8Array, complex gives interleaved (real, imag) scalars.
   */
  toTypedArray() {
    const [, kind, lanes, ArrayType] = DTYPES[this.dtype];
    const count = this.size * lanes;
    if (LITTLE_ENDIAN_HOST && kind !== 'float16') {
      const copy = new Uint8Array(this.data); // aligned copy: decoded bytes may sit at any offset
      return new ArrayType(copy.buffer, 0, count);
    }
    const [bytes, , read] = SCALARS[kind];
    const view = new DataView(this.data.buffer, this.data.byteOffset, this.data.byteLength);
    const out = new ArrayType(count);
    for (let i = 0; i < count; i += 1) out[i] = read(view, i * bytes);
    return out;
  }

  /** {dtype, shape, values}: values flat in C order (bool: true/false, 64-bit ints: numbers
   * when exact else decimal strings, complex: [real, imag] pairs). For display and JSON. */
  toPlain() {
    const [, kind, lanes] = DTYPES[this.dtype];
    let values = Array.from(this.toTypedArray(), (x) => plainScalar(kind, x));
    if (lanes === 2) values = Array.from({ length: this.size }, (_, i) => values.slice(2 * i, 2 * i + 2));
    return { dtype: this.dtype, shape: this.shape.slice(), values };
  }
}

/**
 * A tensor from its dtype, shape and elements (a typed array or plain array in C order;
 * complex dtypes take interleaved real/imag scalars, float16 takes numbers). Without `ct` it
 * returns a Tensor, which `enqueue` encodes in either content type; with `ct` it returns the
 * wire map itself: msgpack {dtype, shape, data: bytes}, JSON {dtype, shape, b64}.
 */
function encodeTensor(dtype, shape, values, ct) {
  checkDtypeShape(dtype, shape);
  const [elementBytes, kind, lanes] = DTYPES[dtype];
  const count = elementCount(shape) * lanes;
  if (values == null || typeof values.length !== 'number' || values.length !== count) {
    const got = values == null || typeof values.length !== 'number' ? typeof values : values.length;
    throw new ProtocolError(`tensor of dtype ${dtype} and shape [${shape}] needs ${count} values, got ${got}`);
  }
  const data = new Uint8Array(elementCount(shape) * elementBytes);
  const matchesLayout = kind !== 'bool' && kind !== 'float16' && values.constructor === DTYPES[dtype][3];
  if (LITTLE_ENDIAN_HOST && matchesLayout) {
    data.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
  } else {
    const [bytes, write] = SCALARS[kind];
    const view = new DataView(data.buffer);
    for (let i = 0; i < count; i += 1) write(view, i * bytes, values[i]);
  }
  const tensor = new Tensor(dtype, shape, data);
  return ct === undefined ? tensor : toWire(checkCt(ct), tensor);
}

/** Encode one value (inputs) in content type `ct`; Tensors become the ct's tensor map. */
function encodeValue(ct, value) {
  const wire = toWire(checkCt(ct), value);
  if (ct === 'msgpack') return Buffer.from(msgpack.encode(wire, { useBigInt64: true }));
  return Buffer.from(JSON.stringify(wire), 'utf8');
}

/** Decode one value; tensor maps become Tensor objects. Malformed bytes raise ProtocolError. */
function decodeValue(ct, bytes) {
  checkCt(ct);
  let raw;
  try {
    raw = ct === 'msgpack'
      ? msgpack.decode(bytes, { useBigInt64: true })
      : JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    throw new ProtocolError(`payload is not valid ${ct}: ${err.message}`);
  }
  return fromWire(ct, raw);
}

/**
 * A result envelope: {v, id, ok, out (when ok), err: {code, message} (when not), model,
 * timings: {queued_ms, wait_ms, exec_ms}, batch: {id, size, reason}, deliveries}.
 */
function decodeEnvelope(ct, bytes) {
  const envelope = decodeValue(ct, bytes);
  if (!isPlainObject(envelope) || typeof envelope.id !== 'string' || typeof envelope.ok !== 'boolean') {
    throw new ProtocolError(`result is not a v1 envelope: ${Buffer.from(bytes).subarray(0, 80).toString('hex')}`);
  }
  return envelope;
}

// -- partitions: a hot model's requests spread over N streams (producer/keys.py) -------------

const CRC_TABLE = Int32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});

/** zlib's CRC-32 (IEEE) as an unsigned 32-bit integer: zlib.crc32 from Node 20.15, else a table. */
const crc32 = zlib.crc32 || ((data) => {
  let crc = -1;
  for (const byte of data) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return (crc ^ -1) >>> 0;
});

/**
 * The partition (0 to n - 1) request `id` goes to: CRC-32 of its UTF-8 bytes modulo `n`. By id,
 * so a request sent again with the same id lands on the stream its first copy is on.
 */
function partitionOf(id, n) {
  return n <= 1 ? 0 : crc32(Buffer.from(id, 'utf8')) % n;
}

/**
 * The tags a manager published in the `tags` field of the model's admission hash (space
 * separated, partition 0 first, and partition 0 is the model id), or [model] without one.
 */
function publishedTags(model, value) {
  const tags = value == null ? [] : String(value).trim().split(/\s+/);
  return tags[0] === model ? tags : [model];
}

const partitionCache = new WeakMap(); // client -> Map(model -> {tags, until: ms})

/**
 * The model's partition tags, as `client`'s Redis publishes them (`HGET
 * nosq:{<model>}:admission tags`), read at most once per PARTITIONS_TTL_S per client and model:
 * a model partitioned (or no longer) later is followed within that time.
 */
async function partitionTags(client, model) {
  let known = partitionCache.get(client);
  if (known === undefined) partitionCache.set(client, (known = new Map()));
  const cached = known.get(model);
  if (cached !== undefined && cached.until > Date.now()) return cached.tags;
  const tags = publishedTags(model, await client.hGet(keys.admission(model), 'tags'));
  if (known.size >= 4096) known.clear(); // many models: start over rather than grow
  known.set(model, { tags, until: Date.now() + PARTITIONS_TTL_S * 1000 });
  return tags;
}

/**
 * Enqueue one request on the model's stream (on a partitioned model, on the stream of the
 * request's partition: `partitionOf(id, tags.length)`); resolves to its id.
 *
 * options: ct ('msgpack' | 'json', default msgpack), timeoutMs (sets the deadline `dl` to now
 * + timeoutMs) or deadlineMs (absolute unix ms), ttlS (result TTL, default 600), method, id
 * (default a random UUID; re-send the same id only to retry an enqueue whose outcome is unknown),
 * priority (0 high, 1 normal, 2 low), reply (a reply-stream client id), admission (default
 * true: enqueue through the backlog-limit script, throwing QueueFullError; false: plain XADD).
 */
async function enqueue(client, model, inputs, options = {}) {
  const {
    ct = 'msgpack', timeoutMs, deadlineMs, ttlS = DEFAULT_TTL_S, method, id = crypto.randomUUID(),
    priority = 1, reply, admission = true,
  } = options;
  if (typeof model !== 'string' || !MODEL_ID_RE.test(model)) {
    throw new ProtocolError(`model id ${JSON.stringify(model)} must match ${MODEL_ID_RE.source}`);
  }
  if (typeof id !== 'string' || !REQUEST_ID_RE.test(id)) {
    throw new ProtocolError(`request id ${JSON.stringify(id)} must match ${REQUEST_ID_RE.source}`);
  }
  if (reply !== undefined && !REQUEST_ID_RE.test(reply)) {
    throw new ProtocolError(`reply client id ${JSON.stringify(reply)} must match ${REQUEST_ID_RE.source}`);
  }
  if (!Number.isInteger(ttlS) || ttlS < 1 || ttlS > MAX_TTL_S) {
    throw new ProtocolError(`result ttl ${ttlS} s must be an integer between 1 and ${MAX_TTL_S}`);
  }
  if (![0, 1, 2].includes(priority)) {
    throw new ProtocolError(`priority ${priority} must be 0 (high), 1 (normal) or 2 (low)`);
  }
  if (timeoutMs !== undefined && deadlineMs !== undefined) {
    throw new ProtocolError('give either timeoutMs or deadlineMs, not both');
  }
  if (timeoutMs !== undefined && !(timeoutMs > 0)) {
    throw new ProtocolError(`timeoutMs must be > 0, got ${timeoutMs}`);
  }
  const deadline = timeoutMs !== undefined ? Date.now() + Math.ceil(timeoutMs) : deadlineMs;
  if (deadline !== undefined && !(Number.isInteger(deadline) && deadline > 0)) {
    throw new ProtocolError(`deadlineMs must be an absolute unix time in integer ms, got ${deadline}`);
  }
  const fields = ['v', String(PROTOCOL_VERSION), 'id', id, 'ct', ct, 'p', encodeValue(ct, inputs)];
  if (method !== undefined) fields.push('method', method);
  if (deadline !== undefined) fields.push('dl', String(deadline));
  if (ttlS !== DEFAULT_TTL_S) fields.push('ttl', String(ttlS));
  if (reply !== undefined) fields.push('reply', reply);
  if (priority !== 1) fields.push('prio', String(priority));

  // the partition's tag stands in for the model id in its stream and admission hash
  const tags = await partitionTags(client, model);
  const tag = tags[partitionOf(id, tags.length)];
  if (!admission) {
    await client.sendCommand(['XADD', keys.requests(tag), '*', ...fields]);
    return id;
  }
  const scriptKeys = ['2', keys.requests(tag), keys.admission(tag)];
  let answer;
  try {
    answer = await client.sendCommand(['EVALSHA', ENQUEUE_SHA, ...scriptKeys, ...fields]);
  } catch (err) {
    if (!String(err.message).startsWith('NOSCRIPT')) throw err;
    answer = await client.sendCommand(['EVAL', ENQUEUE_LUA, ...scriptKeys, ...fields]);
  }
  if (Number(answer[0]) !== 1) {
    throw new QueueFullError(model, Number(answer[1]), answer[2] == null ? null : Number(answer[2]));
  }
  return id;
}

/**
 * Wait for the result of request `id`: GET the result key; if absent, BLPOP the wake-up list
 * for up to `timeoutS` seconds; then GET again. Resolves to the decoded envelope, or throws
 * NosqTimeoutError. `client` is never blocked: the GETs go through it, and BLPOP, which holds
 * its connection until it returns (protocol section 7), runs on a duplicate of it
 * (`client.duplicate()`: same URL, credentials and TLS options), opened for this wait and
 * closed after it. So `client` may be shared with other commands and with concurrent waits.
 * The duplicate costs one connection set-up per wait that has to block; a process with many
 * requests in flight should use a reply stream instead (protocol section 8).
 */
async function waitResult(client, id, ct, timeoutS) {
  checkCt(ct);
  if (!(timeoutS > 0)) throw new ProtocolError(`timeoutS must be > 0, got ${timeoutS}`);
  const binary = client.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });
  let data = await binary.get(keys.result(id));
  if (data == null) {
    await blockingPop(client, keys.done(id), timeoutS);
    data = await binary.get(keys.result(id));
  }
  if (data == null) throw new NosqTimeoutError(id, timeoutS);
  return decodeEnvelope(ct, data);
}

/** BLPOP `key` for up to `timeoutS` s on a connection of its own, a duplicate of `client`. */
async function blockingPop(client, key, timeoutS) {
  const blocking = client.duplicate();
  let lastError = null;
  blocking.on('error', (err) => { lastError = err; }); // surfaced by the failing call below
  try {
    await blocking.connect();
  } catch (err) {
    blocking.destroy();
    throw new NosqError(`cannot open a connection for BLPOP: ${(lastError || err).message}`);
  }
  try {
    await blocking.blPop(key, timeoutS);
  } finally {
    blocking.destroy(); // nothing is pending on it once BLPOP has returned or failed
  }
}

/** Ask the manager not to run request `id`; it answers `cancelled` if it had not dispatched it. */
async function cancel(client, id, ttlS = DEFAULT_TTL_S) {
  await client.set(keys.cancel(id), '1', { EX: ttlS });
}

// -- internals ------------------------------------------------------------------------------

function checkCt(ct) {
  if (!CONTENT_TYPES.includes(ct)) {
    throw new ProtocolError(`content type ${JSON.stringify(ct)} must be one of ${CONTENT_TYPES.join(', ')}`);
  }
  return ct;
}

function checkDtypeShape(dtype, shape) {
  if (!Object.hasOwn(DTYPES, dtype)) {
    throw new ProtocolError(`tensor dtype ${JSON.stringify(dtype)} is not one of ${Object.keys(DTYPES).join(', ')}`);
  }
  if (!Array.isArray(shape) || shape.length > MAX_DIMS || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ProtocolError(`tensor shape ${JSON.stringify(shape)} must be a list of at most ${MAX_DIMS} ints >= 0`);
  }
}

function elementCount(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype;
}

function hasExactKeys(obj, names) {
  const own = Object.keys(obj);
  return own.length === names.length && names.every((n) => Object.hasOwn(obj, n));
}

/** The value as the content type carries it: Tensors become tensor maps, the rest is checked. */
function toWire(ct, value) {
  if (value instanceof Tensor) {
    const shape = value.shape.slice();
    if (ct === 'msgpack') return { dtype: value.dtype, shape, data: value.data };
    return { dtype: value.dtype, shape, b64: Buffer.from(value.data.buffer, value.data.byteOffset, value.data.byteLength).toString('base64') };
  }
  if (Array.isArray(value)) return value.map((item) => toWire(ct, item));
  if (ArrayBuffer.isView(value)) {
    if (ct === 'msgpack' && value instanceof Uint8Array) return value; // msgpack bin: raw bytes
    throw new ProtocolError(`a ${value.constructor.name} has no ${ct} form: wrap it with encodeTensor(dtype, shape, values)`);
  }
  if (isPlainObject(value)) {
    const out = {};
    for (const [key, item] of Object.entries(value)) out[key] = toWire(ct, item);
    return out;
  }
  if (typeof value === 'number' && ct === 'json' && !Number.isFinite(value)) {
    throw new ProtocolError(`${value} has no JSON form: send non-finite numbers inside a float tensor`);
  }
  if (typeof value === 'bigint' && ct === 'json') {
    throw new ProtocolError('a BigInt has no JSON form: use msgpack or an int64 tensor');
  }
  if (value === null || ['string', 'number', 'boolean', 'bigint'].includes(typeof value)) return value;
  throw new ProtocolError(`${typeof value === 'object' ? value.constructor.name : typeof value} is not a msgpack/JSON value or Tensor`);
}

/** Decoded value with tensor maps turned into Tensors (bottom-up). */
function fromWire(ct, value) {
  if (Array.isArray(value)) return value.map((item) => fromWire(ct, item));
  if (value instanceof Uint8Array || value === null || typeof value !== 'object') return value;
  if (!isPlainObject(value)) {
    throw new ProtocolError(`${value.constructor.name} (a msgpack ext type) is not part of protocol v1`);
  }
  if (ct === 'msgpack' && hasExactKeys(value, ['dtype', 'shape', 'data'])) {
    if (!(value.data instanceof Uint8Array)) throw new ProtocolError("tensor 'data' must be msgpack bin (raw bytes)");
    return new Tensor(value.dtype, value.shape, value.data);
  }
  if (ct === 'json' && hasExactKeys(value, ['dtype', 'shape', 'b64'])) {
    if (typeof value.b64 !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(value.b64) || value.b64.length % 4 !== 0) {
      throw new ProtocolError("tensor 'b64' must be a standard base64 string (padded)");
    }
    return new Tensor(value.dtype, value.shape, new Uint8Array(Buffer.from(value.b64, 'base64')));
  }
  const out = {};
  for (const [key, item] of Object.entries(value)) out[key] = fromWire(ct, item);
  return out;
}

function plainScalar(kind, x) {
  if (kind === 'bool') return x !== 0;
  if (typeof x === 'bigint') return x >= BigInt(Number.MIN_SAFE_INTEGER) && x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x.toString();
  return x;
}

const f32 = new DataView(new ArrayBuffer(4));

/** IEEE half bits of a number (rounded to float32 first, then to nearest even half). */
function toHalfBits(value) {
  f32.setFloat32(0, value);
  const bits = f32.getUint32(0);
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf, nan
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // too large: inf
  let half;
  let rest;
  let halfway;
  if (e <= 0) { // subnormal half (or zero)
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    half = mant >>> shift;
    rest = mant & ((1 << shift) - 1);
    halfway = 1 << (shift - 1);
  } else {
    half = (e << 10) | (mant >>> 13);
    rest = mant & 0x1fff;
    halfway = 0x1000;
  }
  if (rest > halfway || (rest === halfway && (half & 1))) half += 1; // a carry rounds up correctly
  return sign | half;
}

function fromHalfBits(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

module.exports = {
  CONTENT_TYPES,
  DEFAULT_TTL_S,
  DTYPES: Object.fromEntries(Object.entries(DTYPES).map(([name, [bytes]]) => [name, bytes])),
  ENQUEUE_LUA,
  MAX_TTL_S,
  MODEL_ID_RE,
  PARTITIONS_TTL_S,
  PROTOCOL_VERSION,
  REQUEST_ID_RE,
  NosqError,
  NosqTimeoutError,
  ProtocolError,
  QueueFullError,
  Tensor,
  cancel,
  decodeEnvelope,
  decodeValue,
  encodeTensor,
  encodeValue,
  enqueue,
  keys,
  partitionOf,
  partitionTags,
  publishedTags,
  waitResult,
};
