// safetensors files (Hugging Face's format), read and written without a copy
// of the whole file in memory: an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the data.
// Reading parses the header once and reads each tensor's bytes on demand
// (`readTensor`), so a 16 GB checkpoint is never held in JS memory at once.
import { closeSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';

/** Bytes per element of the dtypes this example reads and writes. */
export const DTYPE_BYTES = Object.freeze({ F16: 2, BF16: 2, F32: 4, I32: 4, I64: 8, U8: 1, F8_E4M3: 1 });

// The format puts no bound on the header; 100 MB is far past any real one
// (a 70B checkpoint's shard header is a few hundred KB) and keeps a corrupt
// length from allocating gigabytes.
const MAX_HEADER_BYTES = 100_000_000;

export class SafetensorsError extends Error {
  constructor(file, message) {
    super(`${file}: ${message}`);
    this.name = 'SafetensorsError';
    this.code = 'ERR_SAFETENSORS';
  }
}

/**
 * Opens `file` and parses its header. Returns { tensors, metadata, close() }:
 * tensors maps each name to { dtype, shape, offset (absolute), bytes }.
 * Every entry is checked: a known dtype, a byte range inside the file that
 * matches shape × dtype, no two tensors overlapping.
 */
export function openSafetensors(file) {
  const fd = openSync(file, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size < 8) throw new SafetensorsError(file, `is ${size} bytes: shorter than the 8-byte header length`);
    const lengthBytes = Buffer.alloc(8);
    readSync(fd, lengthBytes, 0, 8, 0);
    const headerBytes = Number(lengthBytes.readBigUInt64LE(0));
    if (headerBytes > MAX_HEADER_BYTES || 8 + headerBytes > size)
      throw new SafetensorsError(file, `header length ${headerBytes} does not fit in a file of ${size} bytes`);
    const text = Buffer.alloc(headerBytes);
    readSync(fd, text, 0, headerBytes, 8);
    let header;
    try {
      header = JSON.parse(text.toString('utf8'));
    } catch (e) {
      throw new SafetensorsError(file, `header is not JSON (${e.message})`);
    }
    if (typeof header !== 'object' || header === null || Array.isArray(header)) throw new SafetensorsError(file, 'header is not a JSON object');
    const dataStart = 8 + headerBytes;
    const tensors = checkedEntries(file, header, size - dataStart, dataStart);
    const metadata = header.__metadata__ ?? {};
    let open = true;
    return {
      tensors,
      metadata,
      /** The bytes of tensor `name` (a Buffer of exactly its size). */
      readTensor(name) {
        if (!open) throw new SafetensorsError(file, 'is closed');
        const t = tensors.get(name);
        if (!t) throw new SafetensorsError(file, `has no tensor '${name}'`);
        const out = Buffer.allocUnsafe(t.bytes);
        for (let done = 0; done < t.bytes; ) {
          const n = readSync(fd, out, done, t.bytes - done, t.offset + done);
          if (n === 0) throw new SafetensorsError(file, `ended inside tensor '${name}'`);
          done += n;
        }
        return out;
      },
      close() {
        if (open) closeSync(fd);
        open = false;
      },
    };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

function checkedEntries(file, header, dataBytes, dataStart) {
  const tensors = new Map();
  const ranges = [];
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const { dtype, shape, data_offsets: offsets } = entry ?? {};
    if (!Object.hasOwn(DTYPE_BYTES, dtype)) throw new SafetensorsError(file, `tensor '${name}' has dtype ${JSON.stringify(dtype)} (known: ${Object.keys(DTYPE_BYTES).join(', ')})`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new SafetensorsError(file, `tensor '${name}' has shape ${JSON.stringify(shape)}`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) || offsets[0] > offsets[1] || offsets[1] > dataBytes)
      throw new SafetensorsError(file, `tensor '${name}' has data_offsets ${JSON.stringify(offsets)} outside the ${dataBytes} data bytes`);
    const bytes = shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[dtype];
    if (offsets[1] - offsets[0] !== bytes) throw new SafetensorsError(file, `tensor '${name}' holds ${offsets[1] - offsets[0]} bytes; ${dtype} ${JSON.stringify(shape)} needs ${bytes}`);
    tensors.set(name, { dtype, shape, offset: dataStart + offsets[0], bytes });
    ranges.push([offsets[0], offsets[1], name]);
  }
  ranges.sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < ranges.length; i++)
    if (ranges[i][0] < ranges[i - 1][1]) throw new SafetensorsError(file, `tensors '${ranges[i - 1][2]}' and '${ranges[i][2]}' overlap`);
  return tensors;
}

/**
 * Writes `tensors` ([{ name, dtype, shape, data }], data a TypedArray or
 * Buffer of exactly shape × dtype bytes) and string `metadata` to `file`,
 * the header padded with spaces to 8 bytes as the reference writer does.
 */
export function writeSafetensors(file, tensors, metadata = {}) {
  const header = {};
  if (Object.keys(metadata).length) header.__metadata__ = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, String(v)]));
  let offset = 0;
  for (const t of tensors) {
    if (!Object.hasOwn(DTYPE_BYTES, t.dtype)) throw new SafetensorsError(file, `tensor '${t.name}': unknown dtype ${t.dtype}`);
    const bytes = t.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[t.dtype];
    if (t.data.byteLength !== bytes) throw new SafetensorsError(file, `tensor '${t.name}': ${t.data.byteLength} bytes of data for ${t.dtype} ${JSON.stringify(t.shape)} (${bytes})`);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  json = Buffer.concat([json, Buffer.alloc(padded - json.length, ' ')]);
  const fd = openSync(file, 'w');
  try {
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(json.length));
    writeSync(fd, length);
    writeSync(fd, json);
    for (const t of tensors) writeSync(fd, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  } finally {
    closeSync(fd);
  }
}
