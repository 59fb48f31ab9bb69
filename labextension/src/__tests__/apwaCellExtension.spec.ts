import { apwaCellDecorations } from '../highlight/apwaCellExtension';
import { HIGHLIGHT_CLASSES } from '../highlight/apwaCellRules';

function decorated(source: string): Array<{ from: number; to: number; cls: string }> {
  const found: Array<{ from: number; to: number; cls: string }> = [];
  apwaCellDecorations(source).between(0, source.length, (from, to, deco) => {
    found.push({ from, to, cls: String(deco.spec.class) });
  });
  return found;
}

describe('apwaCellDecorations', () => {
  it('decorates nothing outside %%apwa cells', () => {
    expect(decorated('x = {df}\nprint(x)')).toEqual([]);
  });

  it('marks the magic line, each prompt line and each reference', () => {
    const source = '%%apwa --out result\nFor every row in {df}, ...\nthen {more}';
    expect(decorated(source)).toEqual([
      { from: 0, to: 0, cls: HIGHLIGHT_CLASSES.magicLine },
      { from: 20, to: 20, cls: HIGHLIGHT_CLASSES.promptLine },
      { from: 37, to: 41, cls: HIGHLIGHT_CLASSES.reference },
      { from: 47, to: 47, cls: HIGHLIGHT_CLASSES.promptLine },
      { from: 52, to: 58, cls: HIGHLIGHT_CLASSES.reference }
    ]);
  });
});
