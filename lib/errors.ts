/**
 * Error classes. Every error the library throws has a string `code`:
 * option and argument errors are `TypeError` / `RangeError` with
 * `code: 'ERR_INVALID_ARGUMENT'`; everything else is a {@link VattentionError}.
 */

export type ErrorCode =
  | 'ERR_INVALID_ARGUMENT'
  | 'ERR_CUDA_UNAVAILABLE'
  | 'ERR_LIBRARY_UNAVAILABLE'
  | 'ERR_CUDA'
  | 'ERR_OS'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_NO_SLOT'
  | 'ERR_OUT_OF_RANGE'
  | 'ERR_SEQUENCE_RELEASED'
  | 'ERR_FOREIGN_SEQUENCE'
  | 'ERR_CLOSED'
  | 'ERR_ABORTED'
  | 'ERR_REENTRANT'
  | 'ERR_SUSPENDED'
  | 'ERR_ADDON_LOAD'
  | 'ERR_INTERNAL';

/** A wrong type for an option or argument. */
export class InvalidArgumentTypeError extends TypeError {
  readonly code = 'ERR_INVALID_ARGUMENT' as const;
  constructor(readonly argument: string, message: string) {
    super(`${argument}: ${message}`);
    this.name = 'InvalidArgumentTypeError';
  }
}

/** A value of the right type outside what is allowed. */
export class InvalidArgumentRangeError extends RangeError {
  readonly code = 'ERR_INVALID_ARGUMENT' as const;
  constructor(readonly argument: string, message: string) {
    super(`${argument}: ${message}`);
    this.name = 'InvalidArgumentRangeError';
  }
}

/**
 * Base class of the library's own errors. `code` says which one it is (the
 * subclasses narrow it to their own code); branch on `code` or `instanceof`.
 */
export class VattentionError extends Error {
  constructor(
    /** The error's kind, stable across versions: see {@link ErrorCode}. */
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'VattentionError';
  }

  /**
   * Every error of the library is a VattentionError, the argument errors too:
   * they extend TypeError and RangeError (what Node's own APIs throw for bad
   * arguments), so `instanceof VattentionError` is answered for them here.
   */
  static [Symbol.hasInstance](value: unknown): boolean {
    if (value instanceof InvalidArgumentTypeError || value instanceof InvalidArgumentRangeError) return this === VattentionError;
    return Function.prototype[Symbol.hasInstance].call(this, value);
  }
}

/** A library loaded at run time is not there: cuBLASLt, for `linear` of `vattention/kernels`. The message says what was tried. */
export class LibraryUnavailableError extends VattentionError {
  declare readonly code: 'ERR_LIBRARY_UNAVAILABLE';
  constructor(message: string) {
    super('ERR_LIBRARY_UNAVAILABLE', message);
    this.name = 'LibraryUnavailableError';
  }
}

/** No CUDA driver, no such device, or a device without virtual memory management. */
export class CudaUnavailableError extends VattentionError {
  declare readonly code: 'ERR_CUDA_UNAVAILABLE';
  constructor(message: string) {
    super('ERR_CUDA_UNAVAILABLE', message);
    this.name = 'CudaUnavailableError';
  }
}

/**
 * The native addon could not be loaded (thrown by the first call that needs
 * it). The message names the reason and the command that fixes it.
 */
export class AddonLoadError extends VattentionError {
  declare readonly code: 'ERR_ADDON_LOAD';
  constructor(message: string) {
    super('ERR_ADDON_LOAD', message);
    this.name = 'AddonLoadError';
  }
}

/** A CUDA driver call failed; `status` is the CUresult, `statusName` its name. */
export class CudaError extends VattentionError {
  declare readonly code: 'ERR_CUDA';
  constructor(message: string, readonly status: number, readonly statusName: string) {
    super('ERR_CUDA', message);
    this.name = 'CudaError';
  }
}

/** An operating-system call of the host backend failed (errno in `status`). */
export class OsError extends VattentionError {
  declare readonly code: 'ERR_OS';
  constructor(message: string, readonly status: number, readonly statusName: string) {
    super('ERR_OS', message);
    this.name = 'OsError';
  }
}

/**
 * Physical memory ran out: the budget is reached, or the driver/OS has no
 * memory left. Ordinary and recoverable: the cache is exactly as before.
 */
export class OutOfMemoryError extends VattentionError {
  declare readonly code: 'ERR_OUT_OF_MEMORY';
  constructor(message: string, readonly requestedBytes: number, readonly availableBytes: number) {
    super('ERR_OUT_OF_MEMORY', message);
    this.name = 'OutOfMemoryError';
  }
}

/** Every sequence slot is taken. */
export class NoSlotError extends VattentionError {
  declare readonly code: 'ERR_NO_SLOT';
  constructor(message: string) {
    super('ERR_NO_SLOT', message);
    this.name = 'NoSlotError';
  }
}

/** A token, layer or length past what the cache or the sequence has. */
export class OutOfRangeError extends VattentionError {
  declare readonly code: 'ERR_OUT_OF_RANGE';
  constructor(message: string) {
    super('ERR_OUT_OF_RANGE', message);
    this.name = 'OutOfRangeError';
  }
}

/** The sequence was released (use after release, double release). */
export class SequenceReleasedError extends VattentionError {
  declare readonly code: 'ERR_SEQUENCE_RELEASED';
  constructor(message: string) {
    super('ERR_SEQUENCE_RELEASED', message);
    this.name = 'SequenceReleasedError';
  }
}

/** The sequence belongs to another cache. */
export class ForeignSequenceError extends VattentionError {
  declare readonly code: 'ERR_FOREIGN_SEQUENCE';
  constructor(message: string) {
    super('ERR_FOREIGN_SEQUENCE', message);
    this.name = 'ForeignSequenceError';
  }
}

/** The cache is closed. */
export class ClosedError extends VattentionError {
  declare readonly code: 'ERR_CLOSED';
  constructor(message = 'the KV cache is closed') {
    super('ERR_CLOSED', message);
    this.name = 'ClosedError';
  }
}

/** An asynchronous operation was aborted through its AbortSignal. */
export class AbortedError extends VattentionError {
  declare readonly code: 'ERR_ABORTED';
  constructor(message = 'the operation was aborted') {
    super('ERR_ABORTED', message);
    this.name = 'AbortedError';
  }
}

/**
 * A call made from inside another call of the same cache: a getter or proxy
 * on an argument of step() calling step() again. Refused before anything
 * changed.
 */
export class ReentrantCallError extends VattentionError {
  declare readonly code: 'ERR_REENTRANT';
  constructor(message: string) {
    super('ERR_REENTRANT', message);
    this.name = 'ReentrantCallError';
  }
}

/**
 * The cache is suspended (`cache.suspend()`): its pages were given back to
 * the driver, so nothing that needs memory (growth, copies, sharing, swap)
 * can run until `cache.resume()`.
 */
export class SuspendedError extends VattentionError {
  declare readonly code: 'ERR_SUSPENDED';
  constructor(message = 'the KV cache is suspended') {
    super('ERR_SUSPENDED', message);
    this.name = 'SuspendedError';
  }
}

interface NativeErrorShape {
  code?: string;
  message: string;
  status?: number;
  statusName?: string;
  requestedBytes?: number;
  availableBytes?: number;
  device?: number;
}

/**
 * Turns an error thrown by the native addon into the matching class. In a
 * cache over several devices, an error that happened on one device carries
 * its ordinal as `device` (the message starts with "device N: ").
 */
export function fromNative(error: unknown): unknown {
  if (!(error instanceof Error) || error instanceof AddonLoadError) return error;
  const converted = convert(error as NativeErrorShape);
  const device = (error as NativeErrorShape).device;
  if (typeof device === 'number' && converted instanceof Error) Object.assign(converted, { device });
  return converted;
}

function convert(e: NativeErrorShape): unknown {
  switch (e.code) {
    case 'ERR_CUDA_UNAVAILABLE':
      return new CudaUnavailableError(e.message);
    case 'ERR_LIBRARY_UNAVAILABLE':
      return new LibraryUnavailableError(e.message);
    case 'ERR_CUDA':
      return new CudaError(e.message, e.status ?? 0, e.statusName ?? '');
    case 'ERR_OS':
      return new OsError(e.message, e.status ?? 0, e.statusName ?? '');
    case 'ERR_OUT_OF_MEMORY':
      return new OutOfMemoryError(e.message, e.requestedBytes ?? 0, e.availableBytes ?? 0);
    case 'ERR_NO_SLOT':
      return new NoSlotError(e.message);
    case 'ERR_OUT_OF_RANGE':
      return new OutOfRangeError(e.message);
    case 'ERR_SEQUENCE_RELEASED':
      return new SequenceReleasedError(e.message);
    case 'ERR_CLOSED':
      return new ClosedError(e.message);
    case 'ERR_ABORTED':
      return new AbortedError(e.message);
    case 'ERR_SUSPENDED':
      return new SuspendedError(e.message);
    case 'ERR_INVALID_ARGUMENT': {
      // The core names the option or argument first ("options.memoryBudget: ...") where it can.
      const named = /^([A-Za-z][\w.]*): (.*)$/s.exec(e.message);
      return named ? new InvalidArgumentRangeError(named[1]!, named[2]!) : new InvalidArgumentRangeError('argument', e.message);
    }
    default:
      return new VattentionError('ERR_INTERNAL', e.message);
  }
}

/** Runs a native call; a native error comes out as the package's typed error (fromNative). */
export function callNative<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}
