/**
 * What to highlight in an `%%apwa` cell, as plain offsets: the magic line, the prose body
 * lines and the `{name}` references. Pure functions, shared by the editor extension and tests.
 */

export const APWA_CELL_MAGIC = '%%apwa';

/** CSS classes the editor extension applies (and the stylesheet and browser test use). */
export const HIGHLIGHT_CLASSES = {
  magicLine: 'apwa-magic-line',
  promptLine: 'apwa-prompt-line',
  reference: 'apwa-prompt-ref'
} as const;

export interface TextRange {
  from: number;
  to: number;
}

export interface PromptReference extends TextRange {
  /** The referenced variable, e.g. `df` for `{df}`. */
  name: string;
}

export interface ApwaCellLayout {
  magicLine: TextRange;
  /** Every line after the magic line (the prompt), including empty ones. */
  bodyLines: TextRange[];
  /** `{name}` references inside the body; `{{` and `}}` are literal braces. */
  references: PromptReference[];
}

const IDENTIFIER = /[A-Za-z_][A-Za-z0-9_]*/y;

/** True when the first line is `%%apwa` alone or followed by whitespace and options. */
export function isApwaCell(source: string): boolean {
  if (!source.startsWith(APWA_CELL_MAGIC)) {
    return false;
  }
  const next = source.charAt(APWA_CELL_MAGIC.length);
  return next === '' || /\s/.test(next);
}

/** Split `text` (starting at document offset `base`) into `{name}` references. */
export function findReferences(text: string, base = 0): PromptReference[] {
  const references: PromptReference[] = [];
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if ((ch === '{' || ch === '}') && text[i + 1] === ch) {
      i += 2; // an escaped literal brace
      continue;
    }
    if (ch === '{') {
      IDENTIFIER.lastIndex = i + 1;
      const match = IDENTIFIER.exec(text);
      if (match !== null) {
        const close = i + 1 + match[0].length;
        if (text[close] === '}') {
          references.push({ from: base + i, to: base + close + 1, name: match[0] });
          i = close + 1;
          continue;
        }
      }
    }
    i += 1;
  }
  return references;
}

/** Lay out an `%%apwa` cell; null for any other cell. */
export function analyzeApwaCell(source: string): ApwaCellLayout | null {
  if (!isApwaCell(source)) {
    return null;
  }
  const lines: TextRange[] = [];
  let start = 0;
  for (;;) {
    const newline = source.indexOf('\n', start);
    const end = newline === -1 ? source.length : newline;
    lines.push({ from: start, to: end });
    if (newline === -1) {
      break;
    }
    start = newline + 1;
  }
  const [magicLine, ...bodyLines] = lines;
  const references = bodyLines.flatMap(line =>
    findReferences(source.slice(line.from, line.to), line.from)
  );
  return { magicLine, bodyLines, references };
}
