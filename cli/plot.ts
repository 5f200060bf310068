/** A small SVG line chart, so reports need no plotting library. */
export interface ChartSeries {
  name: string;
  points: [number, number][];
  /** Index into the palette (default: the series' own index), so that related series share a colour. */
  color?: number;
  dashed?: boolean;
}

/** A horizontal reference line (a budget, a ceiling). */
export interface ChartLine {
  name: string;
  y: number;
}

export interface ChartOptions {
  title: string;
  xLabel: string;
  yLabel: string;
  series: ChartSeries[];
  logY?: boolean;
  hLines?: ChartLine[];
  width?: number;
  height?: number;
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e'];

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * Round tick values covering [min, max]: a step of 1, 2 or 5 × 10^k giving
 * about `count` intervals, from a multiple of the step below min to one above max.
 */
export function niceTicks(min: number, max: number, count = 5): number[] {
  if (!(max > min)) max = min + 1;
  const magnitude = 10 ** Math.floor(Math.log10((max - min) / count));
  const intervals = (s: number) => Math.ceil(max / s - 1e-9) - Math.floor(min / s);
  // the step whose number of intervals is closest to `count` (more, on a tie)
  const step = [1, 2, 5, 10]
    .map((f) => f * magnitude)
    .reduce((best, s) => {
      const d = Math.abs(intervals(s) - count), bd = Math.abs(intervals(best) - count);
      return d < bd || (d === bd && intervals(s) > intervals(best)) ? s : best;
    });
  const first = Math.floor(min / step) * step;
  const ticks: number[] = [];
  for (let t = first; t < max + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  if (ticks[ticks.length - 1]! < max) ticks.push(+(ticks[ticks.length - 1]! + step).toPrecision(12));
  return ticks;
}

export function lineChart(o: ChartOptions): string {
  const width = o.width ?? 900;
  const lines = o.hLines ?? [];
  // The legend: one row per entry above the plot, so that no two names overlap.
  const legendRows = o.series.length + lines.length;
  const height = (o.height ?? 420) + 16 * legendRows;
  const m = { left: 70, right: 20, top: 40 + 16 * legendRows, bottom: 50 };
  const all = [...o.series.flatMap((s) => s.points), ...lines.map((l) => [0, l.y] as [number, number])];
  const ty = (y: number) => (o.logY ? Math.log10(Math.max(y, 1e-3)) : y);
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => ty(p[1]));
  const xTicks = niceTicks(Math.min(...xs, 0), Math.max(...xs, 1));
  const xMin = xTicks[0]!;
  const xMax = xTicks[xTicks.length - 1]!;
  const linearY = o.logY ? [] : niceTicks(0, Math.max(...ys, 1));
  const yMin = o.logY ? Math.floor(Math.min(...ys, 0)) : 0;
  const yMax = o.logY ? Math.ceil(Math.max(...ys, 1)) : linearY[linearY.length - 1]!;
  const px = (x: number) => m.left + ((x - xMin) / (xMax - xMin || 1)) * (width - m.left - m.right);
  const py = (y: number) => height - m.bottom - ((ty(y) - yMin) / (yMax - yMin || 1)) * (height - m.top - m.bottom);
  const parts: string[] = [];
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`);
  parts.push(`<rect width="100%" height="100%" fill="white"/>`);
  parts.push(`<text x="${width / 2}" y="22" text-anchor="middle" font-size="15">${esc(o.title)}</text>`);
  // axes and ticks
  parts.push(`<line x1="${m.left}" y1="${height - m.bottom}" x2="${width - m.right}" y2="${height - m.bottom}" stroke="black"/>`);
  parts.push(`<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${height - m.bottom}" stroke="black"/>`);
  const yTicks = o.logY ? Array.from({ length: yMax - yMin + 1 }, (_, i) => 10 ** (yMin + i)) : linearY;
  for (const t of yTicks) {
    const y = py(t);
    parts.push(`<line x1="${m.left - 4}" y1="${y}" x2="${width - m.right}" y2="${y}" stroke="#ddd"/>`);
    parts.push(`<text x="${m.left - 8}" y="${y + 4}" text-anchor="end">${t}</text>`);
  }
  for (const x of xTicks) parts.push(`<text x="${px(x)}" y="${height - m.bottom + 18}" text-anchor="middle">${x}</text>`);
  parts.push(`<text x="${width / 2}" y="${height - 12}" text-anchor="middle">${esc(o.xLabel)}</text>`);
  parts.push(`<text x="16" y="${height / 2}" text-anchor="middle" transform="rotate(-90 16 ${height / 2})">${esc(o.yLabel)}</text>`);
  const legend = (row: number, color: string, dash: string, name: string) => {
    const y = 34 + 16 * row;
    parts.push(`<line x1="${m.left + 10}" y1="${y}" x2="${m.left + 34}" y2="${y}" stroke="${color}" stroke-width="2"${dash}/>`);
    parts.push(`<text x="${m.left + 40}" y="${y + 4}">${esc(name)}</text>`);
  };
  o.series.forEach((s, i) => {
    const color = COLORS[(s.color ?? i) % COLORS.length]!;
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : '';
    const d = s.points.map((p, k) => `${k ? 'L' : 'M'}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join('');
    parts.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="1.5"${dash}/>`);
    legend(i, color, dash, s.name);
  });
  lines.forEach((l, i) => {
    const y = py(l.y).toFixed(1);
    parts.push(`<line x1="${m.left}" y1="${y}" x2="${width - m.right}" y2="${y}" stroke="black" stroke-dasharray="2 3"/>`);
    legend(o.series.length + i, 'black', ' stroke-dasharray="2 3"', l.name);
  });
  parts.push('</svg>');
  return parts.join('\n');
}
