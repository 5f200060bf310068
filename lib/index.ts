export { KVCache } from './kv-cache.js';
export { Sequence, SwappedSequence } from './sequence.js';
export type {
  DeviceOption,
  ForkOptions,
  GrowAsyncOptions,
  KVCacheEvents,
  PublishOptions,
  ReadRange,
  ReleaseOptions,
  ReserveOptions,
  SuspendOptions,
  SwapOutOptions,
  TensorInfo,
  TokenIds,
  TokenRange,
} from './call-options.js';
export type { CacheStats, CallStats, DeviceStats, HostMemoryStats, LayoutStats, PrefetchStats, PrefixCacheStats, SlotStats } from './stats.js';
export { DTYPE_BYTES } from './options.js';
export { formatPrometheus } from './metrics.js';
export type { MetricsOptions } from './metrics.js';
export type { BackendChoice, DType, KVCacheOptions, KVKind, KVLayoutChoice, NormalizedOptions } from './options.js';
export { driverInfo, autoBackend } from './info.js';
export type { DeviceInfo, DriverInfo } from './info.js';
export {
  AbortedError,
  SuspendedError,
  ClosedError,
  CudaError,
  AddonLoadError,
  CudaUnavailableError,
  ForeignSequenceError,
  InvalidArgumentRangeError,
  InvalidArgumentTypeError,
  LibraryUnavailableError,
  NoSlotError,
  OsError,
  OutOfMemoryError,
  OutOfRangeError,
  ReentrantCallError,
  SequenceReleasedError,
  VattentionError,
} from './errors.js';
export type { ErrorCode } from './errors.js';
