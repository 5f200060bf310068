// Prints, after the run, why tests were skipped: one line per reason, with
// the number of tests it covers. Every skipped test says why in its name or
// its suite's ("(skipped: …)"); the default reporter shows that only with
// --reporter=verbose.
import type { Reporter, TestModule } from 'vitest/node';

export default class SkipReasons implements Reporter {
  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    const reasons = new Map<string, number>();
    for (const module of testModules) {
      for (const test of module.children.allTests('skipped')) {
        const why = /\(skipped: (.*?)\)(?: >|$)/.exec(test.fullName)?.[1] ?? 'no reason given (a bug in the test: say why)';
        reasons.set(why, (reasons.get(why) ?? 0) + 1);
      }
    }
    if (reasons.size === 0) return;
    const lines = [...reasons].sort((a, b) => b[1] - a[1]).map(([why, n]) => `  ${String(n).padStart(4)} skipped: ${why}`);
    process.stdout.write(`\nSkipped tests, by reason:\n${lines.join('\n')}\n`);
  }
}
