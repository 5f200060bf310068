// For TypeScript's older `node10` module resolution, which ignores the
// package's exports map: `vattention/kernels` resolves to this file.
export * from './dist/cjs/kernels.js';
