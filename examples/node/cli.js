#!/usr/bin/env node
'use strict';
/**
 * Command line for the nosq Node example (Redis URL from NOSQ_REDIS_URL,
 * default redis://127.0.0.1:6379/0):
 *
 *   node cli.js enqueue <model> <ct> [--timeout-ms=N] [--ttl-s=N] [--method=NAME] [--id=ID]
 *                       [--admission=off]
 *       enqueues {x: float32 tensor [[0,1,2],[3,4,5]], note: "hello from node"};
 *       prints {"id": "..."}; --admission=off: plain XADD instead of the backlog-limit script
 *   node cli.js enqueue-many <model> <ct> <count> [options of enqueue but --id]
 *       enqueues that request <count> times through one client (one read of the model's
 *       partition tags); prints {"ids": [...]}
 *   node cli.js wait <id> <ct> <timeoutS>
 *       prints the result envelope as JSON, tensors as {dtype, shape, values}; waits with
 *       nosq.waitResult (GET on the client, BLPOP on a duplicate connection it opens and closes)
 *   node cli.js wait-many <ct> <timeoutS> <id>...
 *       waits for every id at once; prints their envelopes as a JSON list, in the order given
 *   node cli.js partition-of <n> <id>...
 *       prints the partition of each id among n (nosq.partitionOf) as a JSON list
 *
 * Exit status: 0 done (also for an envelope with ok: false), 2 usage, 3 queue full,
 * 4 no result within the timeout, 1 anything else.
 */

const { createClient } = require('redis');
const nosq = require('./nosq');

const USAGE = `usage:
  node cli.js enqueue <model> <msgpack|json> [--timeout-ms=N] [--ttl-s=N] [--method=NAME] [--id=ID]
                      [--admission=off]
  node cli.js enqueue-many <model> <msgpack|json> <count> [options of enqueue but --id]
  node cli.js wait <id> <msgpack|json> <timeoutS>
  node cli.js wait-many <msgpack|json> <timeoutS> <id>...
  node cli.js partition-of <n> <id>...`;

/** The fixed request the tests and the docs use. */
function exampleInputs() {
  return {
    x: nosq.encodeTensor('float32', [2, 3], Float32Array.of(0, 1, 2, 3, 4, 5)),
    note: 'hello from node',
  };
}

function parseFlags(args) {
  const flags = {};
  const names = {
    '--timeout-ms': 'timeoutMs', '--ttl-s': 'ttlS', '--method': 'method', '--id': 'id', '--admission': 'admission',
  };
  for (const arg of args) {
    const [name, value] = arg.split(/=(.*)/s);
    if (!(name in names) || value === undefined || value === '') throw new UsageError(`unknown or empty option ${arg}`);
    if (name === '--admission' && !['on', 'off'].includes(value)) throw new UsageError(`${arg}: give on or off`);
    if (name === '--admission') flags.admission = value === 'on';
    else flags[names[name]] = ['timeoutMs', 'ttlS'].includes(names[name]) ? Number(value) : value;
  }
  return flags;
}

function positiveNumber(name, text, integer = false) {
  const value = Number(text);
  if (!(value > 0) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`${name} must be ${integer ? 'an integer' : 'a number'} > 0, got ${text}`);
  }
  return value;
}

class UsageError extends Error {}

/** JSON.stringify replacer: Tensors as {dtype, shape, values}, BigInts as numbers or strings. */
function plain(_key, value) {
  if (value instanceof nosq.Tensor) return value.toPlain();
  if (typeof value === 'bigint') return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  if (value instanceof Uint8Array) return { bytes_b64: Buffer.from(value).toString('base64') };
  return value;
}

async function main(argv) {
  const [command, ...rest] = argv;
  if (command === 'enqueue' && rest.length >= 2) {
    const [model, ct, ...flags] = rest;
    const options = { ct, ...parseFlags(flags) };
    return withClient(async (client) => {
      const id = await nosq.enqueue(client, model, exampleInputs(), options);
      process.stdout.write(`${JSON.stringify({ id })}\n`);
    });
  }
  if (command === 'enqueue-many' && rest.length >= 3) {
    const [model, ct, count, ...flags] = rest;
    const n = positiveNumber('count', count, true);
    const options = { ct, ...parseFlags(flags) };
    if (options.id !== undefined) throw new UsageError('enqueue-many gives each request an id of its own: no --id');
    return withClient(async (client) => {
      const ids = [];
      for (let i = 0; i < n; i += 1) ids.push(await nosq.enqueue(client, model, exampleInputs(), options));
      process.stdout.write(`${JSON.stringify({ ids })}\n`);
    });
  }
  if (command === 'wait' && rest.length === 3) {
    const [id, ct, timeout] = rest;
    const timeoutS = positiveNumber('timeoutS', timeout);
    return withClient(async (client) => {
      const envelope = await nosq.waitResult(client, id, ct, timeoutS);
      process.stdout.write(`${JSON.stringify(envelope, plain)}\n`);
    });
  }
  if (command === 'wait-many' && rest.length >= 3) {
    const [ct, timeout, ...ids] = rest;
    const timeoutS = positiveNumber('timeoutS', timeout);
    return withClient(async (client) => {
      const envelopes = await Promise.all(ids.map((id) => nosq.waitResult(client, id, ct, timeoutS)));
      process.stdout.write(`${JSON.stringify(envelopes, plain)}\n`);
    });
  }
  if (command === 'partition-of' && rest.length >= 2) {
    const [count, ...ids] = rest;
    const n = positiveNumber('n', count, true);
    process.stdout.write(`${JSON.stringify(ids.map((id) => nosq.partitionOf(id, n)))}\n`);
    return undefined;
  }
  throw new UsageError(USAGE);
}

async function withClient(fn) {
  const url = process.env.NOSQ_REDIS_URL || 'redis://127.0.0.1:6379/0';
  let lastError = null;
  const client = createClient({ url, socket: { connectTimeout: 5000, reconnectStrategy: false } });
  client.on('error', (err) => { lastError = err; }); // surfaced by the failing command below
  try {
    await client.connect();
  } catch (err) {
    throw new Error(`cannot reach Redis at ${url.replace(/\/\/[^@]*@/, '//***@')}: ${(lastError || err).message}`);
  }
  try {
    return await fn(client);
  } finally {
    await client.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`${err.message}\n`);
  if (err instanceof UsageError) process.exitCode = 2;
  else if (err instanceof nosq.QueueFullError) process.exitCode = 3;
  else if (err instanceof nosq.NosqTimeoutError) process.exitCode = 4;
  else process.exitCode = 1;
});
