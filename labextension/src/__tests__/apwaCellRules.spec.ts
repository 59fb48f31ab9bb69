import { analyzeApwaCell, findReferences, isApwaCell } from '../highlight/apwaCellRules';

describe('isApwaCell', () => {
  it('recognises the cell magic on the first line only', () => {
    expect(isApwaCell('%%apwa')).toBe(true);
    expect(isApwaCell('%%apwa --out result\nhello')).toBe(true);
    expect(isApwaCell('%%apwa\tx')).toBe(true);
    expect(isApwaCell('%%apwant\nhello')).toBe(false);
    expect(isApwaCell('%apwa hello')).toBe(false);
    expect(isApwaCell(' %%apwa\nhello')).toBe(false);
    expect(isApwaCell('x = 1\n%%apwa')).toBe(false);
  });
});

describe('findReferences', () => {
  it('finds {name} references with their offsets', () => {
    const text = 'For every row in {df}, compare with {prices_2024}.';
    expect(findReferences(text, 100)).toEqual([
      { from: 117, to: 121, name: 'df' },
      { from: 136, to: 149, name: 'prices_2024' }
    ]);
  });

  it('ignores escaped braces, non-identifiers and unclosed braces', () => {
    expect(findReferences('literal {{df}} braces')).toEqual([]);
    expect(findReferences('json {"a": 1} and {1x} and {df.col} and {df')).toEqual([]);
    // Like str.format: `{{{df}}}` is a literal brace around a reference.
    expect(findReferences('{{{df}}}')).toEqual([{ from: 2, to: 6, name: 'df' }]);
    expect(findReferences('{{ {df} }}')).toEqual([{ from: 3, to: 7, name: 'df' }]);
  });
});

describe('analyzeApwaCell', () => {
  it('returns null for other cells', () => {
    expect(analyzeApwaCell('import pandas as pd')).toBeNull();
  });

  it('splits the magic line, body lines and references', () => {
    const source = "%%apwa --out result\nFor every row in {df}, don't guess.\n\nUse {notes}";
    const layout = analyzeApwaCell(source);
    expect(layout).not.toBeNull();
    expect(layout!.magicLine).toEqual({ from: 0, to: 19 });
    expect(layout!.bodyLines).toEqual([
      { from: 20, to: 55 },
      { from: 56, to: 56 },
      { from: 57, to: 68 }
    ]);
    expect(layout!.references.map(ref => source.slice(ref.from, ref.to))).toEqual([
      '{df}',
      '{notes}'
    ]);
  });

  it('has no body for a bare magic line', () => {
    expect(analyzeApwaCell('%%apwa')).toEqual({
      magicLine: { from: 0, to: 6 },
      bodyLines: [],
      references: []
    });
  });
});
