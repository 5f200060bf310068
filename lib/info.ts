/** What the machine offers: the CUDA driver, its devices, and the backend 'auto' picks. */
import { addon, type NativeDeviceInfo } from './native.js';
import { checkInteger } from './options.js';

export interface DeviceInfo extends NativeDeviceInfo {}

export interface DriverInfo {
  /** libcuda.so.1 was opened and cuInit succeeded. */
  loaded: boolean;
  /** Path of the driver library that was opened. */
  library: string;
  /** Why the driver is unusable, when `loaded` is false. */
  problem: string;
  /** cuDriverGetVersion, e.g. 13000 for CUDA 13.0; 0 without a driver. */
  version: number;
  /** CUDA_VERSION of the cuda.h our driver declarations were checked against at build time (0: not checked). */
  typesCheckedAgainst: number;
  devices: DeviceInfo[];
}

/** Loads the CUDA driver if present (once per process) and describes it. Never throws for a missing driver. */
export function driverInfo(): DriverInfo {
  return addon.driverInfo();
}

/** The backend 'auto' resolves to for a device: 'cuda' when it exists and supports VMM, else 'host'. */
export function autoBackend(device = 0): 'cuda' | 'host' {
  checkInteger('device', device, 0, 1023);
  const info = driverInfo();
  return info.devices[device]?.vmmSupported ? 'cuda' : 'host';
}
