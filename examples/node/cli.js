#!/usr/bin/env node
'use strict';
/**
 * Command line for the nosq Node example (Redis URL from NOSQ_REDIS_URL,
 * default redis://127.0.0.1:6379/0):
 *
 *   node cli.js enqueue <model> <ct> [--timeout-ms=N] [--ttl-s=N] [--method=NAME] [--id=ID]
 *       enqueues {x: float32 tensor [[0,1,2],[3,4,5]], note: "hello from node"};
 *       prints {"id": "..."}
 *   node cli.js wait <id> <ct> <timeoutS>
 *       prints the result envelope as JSON, tensors as {dtype, shape, values}; waits with
 *       nosq.waitResult (GET on the client, BLPOP on a duplicate connection it opens and closes)
 *
 * Exit status: 0 done (also for an envelope with ok: false), 2 usage, 3 queue full,
 * 4 no result within the timeout, 1 anything else.
 */

const { createClient } = require('redis');
const nosq = require('./nosq');

const USAGE = `usage:
  node cli.js enqueue <model> <msgpack|json> [--timeout-ms=N] [--ttl-s=N] [--method=NAME] [--id=ID]
  node cli.js wait <id> <msgpack|json> <timeoutS>`;

/** The fixed request the tests and the docs use. */
function exampleInputs() {
  return {
    x: nosq.encodeTensor('float32', [2, 3], Float32Array.of(0, 1, 2, 3, 4, 5)),
    note: 'hello from node',
  };
}

function parseFlags(args) {
  const flags = {};
  const names = { '--timeout-ms': 'timeoutMs', '--ttl-s': 'ttlS', '--method': 'method', '--id': 'id' };
  for (const arg of args) {
    const [name, value] = arg.split(/=(.*)/s);
    if (!(name in names) || value === undefined || value === '') throw new UsageError(`unknown or empty option ${arg}`);
    flags[names[name]] = ['timeoutMs', 'ttlS'].includes(names[name]) ? Number(value) : value;
  }
  return flags;
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
  if (command === 'wait' && rest.length === 3) {
    const [id, ct, timeout] = rest;
    const timeoutS = Number(timeout);
    if (!(timeoutS > 0)) throw new UsageError(`timeoutS must be a number > 0, got ${timeout}`);
    return withClient(async (client) => {
      const envelope = await nosq.waitResult(client, id, ct, timeoutS);
      process.stdout.write(`${JSON.stringify(envelope, plain)}\n`);
    });
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
