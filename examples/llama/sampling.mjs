// Token choice from a row of logits: greedy, or a sample of
// softmax(logits / temperature), optionally cut to its nucleus (top-p: the
// fewest most likely tokens whose probability adds up to at least p).
// A sample is a function of (seed, request, position) alone, so a request
// gets the same tokens whatever it is batched with, and a preempted request
// recomputed from its prompt continues as it would have.
// On the host from the logits the model returns: top-p needs an ordering of
// the likely tokens. (The argmax kernel's own temperature mode samples on the
// GPU without reading the logits back, for loops that must not sync; it has
// no top-p.)

export class SamplingError extends Error {
  /** `option`: the option of createSampler at fault ('temperature', 'topP' or 'seed'). */
  constructor(message, option) {
    super(message);
    this.name = 'SamplingError';
    this.code = 'ERR_SAMPLING_OPTIONS';
    this.option = option;
  }
}

/** `{ greedy, pick(logits, key, position) }` for temperature 0 (greedy) or > 0, top-p in (0, 1]. */
export function createSampler({ temperature = 0, topP = 1, seed = 1 } = {}) {
  if (typeof temperature !== 'number' || !Number.isFinite(temperature) || temperature < 0)
    throw new SamplingError(`temperature must be 0 (greedy) or a positive finite number, got ${temperature}`, 'temperature');
  if (typeof topP !== 'number' || !(topP > 0 && topP <= 1)) throw new SamplingError(`topP must be in (0, 1], got ${topP}`, 'topP');
  if (temperature === 0 && topP < 1) throw new SamplingError('topP applies to sampling: it needs a temperature above 0', 'topP');
  if (!Number.isSafeInteger(seed) || seed < 0) throw new SamplingError(`seed must be a non-negative integer, got ${seed}`, 'seed');
  if (temperature === 0) return { greedy: true, pick: (logits) => argmax(logits) };
  return {
    greedy: false,
    pick(logits, key, position) {
      const { indices, weights, mass } = nucleus(logits, temperature, topP);
      let target = uniform(seed, key, position) * mass;
      for (let i = 0; i < indices.length; i++) {
        target -= weights[i];
        if (target < 0) return indices[i];
      }
      return indices[indices.length - 1]; // rounding left the target on the last edge
    },
  };
}

/** Index of the largest value, the first of equals. */
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/**
 * The tokens a sample draws from, most likely first (equals by index), with
 * their unnormalised weights exp((logit − max) / temperature) and the sum of
 * those weights (`mass`). With topP < 1, the shortest such prefix of the
 * vocabulary whose share of the whole reaches topP; with topP 1, every token
 * in index order (no sort).
 */
export function nucleus(logits, temperature, topP) {
  const n = logits.length, top = logits[argmax(logits)];
  const w = new Float64Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) total += w[i] = Math.exp((logits[i] - top) / temperature);
  const goal = topP * total;
  // A floor on the weight that keeps at least `goal` of the mass (found by
  // bisection over (0, 1], the largest weight being 1) leaves a short list to sort.
  let floor = 0;
  if (topP < 1) {
    let hi = 1;
    for (let round = 0; round < 40; round++) {
      const mid = (floor + hi) / 2;
      let kept = 0;
      for (let i = 0; i < n; i++) if (w[i] >= mid) kept += w[i];
      if (kept >= goal) floor = mid;
      else hi = mid;
    }
  }
  const candidates = [];
  for (let i = 0; i < n; i++) if (w[i] >= floor) candidates.push(i);
  if (topP < 1) candidates.sort((a, b) => w[b] - w[a] || a - b); // all of them: any order draws the same distribution
  const indices = [], weights = [];
  let mass = 0;
  for (const i of candidates) {
    indices.push(i);
    weights.push(w[i]);
    mass += w[i];
    if (topP < 1 && mass >= goal) break;
  }
  return { indices, weights, mass };
}

/** A uniform [0, 1) from (seed, key, position): a counter-based hash. */
export function uniform(seed, key, position) {
  let h = mix(0x9e3779b9 ^ (seed >>> 0));
  h = mix(h ^ Math.floor(seed / 2 ** 32));
  h = mix(h ^ (key >>> 0));
  h = mix(h ^ (position >>> 0));
  return h / 2 ** 32;
}

/** The murmur3 finaliser, on 32 bits. */
function mix(h) {
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}
