import { isActiveState, parseKernelMessage, parseRunSummary } from '../protocol';
import { makeRun } from './fixtures';

describe('parseKernelMessage', () => {
  it('accepts a snapshot and keeps only valid runs', () => {
    const good = makeRun();
    const message = parseKernelMessage({
      type: 'snapshot',
      runs: [good, { id: 'x', state: 'exploded' }, 'nonsense']
    });
    expect(message).toEqual({ type: 'snapshot', runs: [good] });
  });

  it('accepts an update', () => {
    const run = makeRun({ state: 'done', done: 10 });
    expect(parseKernelMessage({ type: 'update', run })).toEqual({ type: 'update', run });
  });

  it('accepts an error about a run (a refused approve)', () => {
    expect(parseKernelMessage({ type: 'error', run_id: 'r', message: 'a --dry-run' })).toEqual({
      type: 'error',
      run_id: 'r',
      message: 'a --dry-run'
    });
    expect(parseKernelMessage({ type: 'error', run_id: 3 })).toBeNull();
  });

  it('rejects unknown or malformed messages', () => {
    expect(parseKernelMessage(null)).toBeNull();
    expect(parseKernelMessage([])).toBeNull();
    expect(parseKernelMessage({ type: 'hello' })).toBeNull();
    expect(parseKernelMessage({ type: 'snapshot', runs: 'no' })).toBeNull();
    expect(parseKernelMessage({ type: 'update', run: { id: 1 } })).toBeNull();
  });
});

describe('parseRunSummary', () => {
  it('fills missing counters and nullable fields, drops extras', () => {
    const run = parseRunSummary({ id: 'r', state: 'planning', surprise: true, tokens: -3 });
    expect(run).toEqual({
      id: 'r',
      prompt: '',
      state: 'planning',
      done: 0,
      total: 0,
      failed: 0,
      running: 0,
      tokens: 0,
      elapsed_s: 0,
      started_at: 0,
      cell_id: null,
      out: null,
      error: null,
      status: null,
      skipped: 0,
      side_effects: [],
      prompt_full: null,
      earlier: false
    });
  });

  it('keeps an unknown token figure unknown (a run of an earlier kernel)', () => {
    const run = parseRunSummary({ id: 'r', state: 'done', tokens: null, earlier: true });
    expect(run?.tokens).toBeNull();
    expect(run?.earlier).toBe(true);
    expect(parseRunSummary({ id: 'r', state: 'done', tokens: 12 })?.tokens).toBe(12);
  });

  it('keeps the whole prompt for the hover', () => {
    const run = parseRunSummary({ id: 'r', state: 'done', prompt: 'a', prompt_full: 'a\nb' });
    expect(run?.prompt_full).toBe('a\nb');
  });

  it('keeps the status line, skipped count and side-effect stages', () => {
    const run = parseRunSummary({
      id: 'r',
      state: 'done',
      status: 'done with 3 failed',
      skipped: 4,
      side_effects: ['send', 7]
    });
    expect(run?.status).toBe('done with 3 failed');
    expect(run?.skipped).toBe(4);
    expect(run?.side_effects).toEqual(['send']);
  });
});

describe('isActiveState', () => {
  it('treats planning, awaiting approval and running as active', () => {
    expect(isActiveState('planning')).toBe(true);
    expect(isActiveState('awaiting_approval')).toBe(true);
    expect(isActiveState('running')).toBe(true);
    expect(isActiveState('done')).toBe(false);
    expect(isActiveState('failed')).toBe(false);
    expect(isActiveState('cancelled')).toBe(false);
  });
});
