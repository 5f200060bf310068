// The report plots' axes carry round values (1, 2 or 5 × 10^k steps) that cover the data.
import { describe, expect, it } from 'vitest';
import { lineChart, niceTicks } from '../cli/plot.js';

describe('plot axes', () => {
  it.each([
    [0, 1019.6, [0, 200, 400, 600, 800, 1000, 1200]],
    [0, 2914, [0, 500, 1000, 1500, 2000, 2500, 3000]],
    [0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1]],
    [0, 37, [0, 10, 20, 30, 40]],
    [12, 97, [0, 20, 40, 60, 80, 100]],
  ])('niceTicks(%d, %d) is %j', (min, max, ticks) => {
    expect(niceTicks(min, max)).toEqual(ticks);
  });

  it('a chart labels its axes with those values and every series is drawn', () => {
    const svg = lineChart({ title: 't', xLabel: 'step', yLabel: 'MiB', series: [{ name: 'a', points: [[0, 3], [2914, 1019.6]] }, { name: 'b', points: [[0, 1]] }] });
    expect(svg).toContain('>1200</text>');
    expect(svg).toContain('>3000</text>');
    expect(svg.match(/<path /g)).toHaveLength(2);
  });
});
