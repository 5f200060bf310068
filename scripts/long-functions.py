#!/usr/bin/env python3
"""Lists functions over a line limit in the hand-written native sources
(issue 28's rule: none over 60). A brace matcher, not a parser: a block whose
opening brace follows a parameter list (`)` then qualifiers) and that is not
inside another function counts as a function."""
import re, sys, pathlib

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 60
ROOT = pathlib.Path(__file__).resolve().parent.parent / 'native'

def strip(text):
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'/\*.*?\*/', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S)
    text = re.sub(r'R"\((.*?)\)"', lambda m: '""' + '\n' * m.group(0).count('\n'), text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\\n])*"', '""', text)
    text = re.sub(r"'(\\.|[^'\\\n])*'", "''", text)
    return text

SIG = re.compile(r'\)\s*(const\s*)?(noexcept\s*)?(override\s*)?(final\s*)?(->\s*[\w:<>,\s*&]+)?\s*$')
INIT = re.compile(r'\)\s*:\s*[\w:]+[({]', re.S)
CONTROL = re.compile(r'\b(if|for|while|switch|catch)\s*\([^;{}]*\)\s*$')

failures = 0
for path in sorted(ROOT.rglob('*')):
    if path.suffix not in ('.cc', '.h', '.cu', '.cuh') or path.name.endswith('_ptx.cc'):
        continue
    text = strip(path.read_text())
    stack = []  # (is_function, start_line)
    in_function = 0
    for i, ch in enumerate(text):
        if ch == '{':
            head = text[max(0, i - 400):i]
            head_tail = head[head.rfind(';') + 1:] if ';' in head else head
            head_tail = head_tail[head_tail.rfind('}') + 1:] if '}' in head_tail else head_tail
            is_fn = not in_function and (SIG.search(head) or INIT.search(head_tail)) and not CONTROL.search(head) \
                and not re.search(r'\]\s*\([^)]*\)\s*(mutable\s*)?(->[^{]*)?$', head)
            stack.append((bool(is_fn), text.count('\n', 0, i) + 1, head_tail.strip().split('\n')[-1][:70]))
            if is_fn:
                in_function += 1
        elif ch == '}' and stack:
            is_fn, start, name = stack.pop()
            if is_fn:
                in_function -= 1
                end = text.count('\n', 0, i) + 1
                if end - start + 1 > LIMIT:
                    failures += 1
                    print(f'{path.relative_to(ROOT.parent)}:{start}: {end - start + 1} lines: {name}')
sys.exit(1 if failures else 0)
