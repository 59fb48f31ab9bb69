import {
  formatElapsed,
  formatProgress,
  formatTokens,
  promptLabels,
  INITIAL_STATE,
  liveElapsed,
  MAX_RUNS,
  progressFraction,
  reduceRuns,
  RunsState,
  statusText
} from '../runsState';
import { makeRun } from './fixtures';

const snapshot = (state: RunsState, runs = [makeRun()], receivedAt = 1000): RunsState =>
  reduceRuns(state, { type: 'message', message: { type: 'snapshot', runs }, receivedAt });

describe('reduceRuns', () => {
  it('connects on a snapshot and sorts newest first', () => {
    const older = makeRun({ id: 'old', started_at: 10 });
    const newer = makeRun({ id: 'new', started_at: 20 });
    const state = snapshot(reduceRuns(INITIAL_STATE, { type: 'connecting' }), [older, newer]);
    expect(state.connection).toBe('connected');
    expect(state.runs.map(run => run.id)).toEqual(['new', 'old']);
    expect(state.runs[0].receivedAt).toBe(1000);
  });

  it('upserts updates by id without mutating the previous state', () => {
    const before = snapshot(INITIAL_STATE);
    const after = reduceRuns(before, {
      type: 'message',
      message: { type: 'update', run: makeRun({ done: 5 }) },
      receivedAt: 2000
    });
    expect(after.runs).toHaveLength(1);
    expect(after.runs[0].done).toBe(5);
    expect(before.runs[0].done).toBe(0);

    const added = reduceRuns(after, {
      type: 'message',
      message: { type: 'update', run: makeRun({ id: 'run-2', started_at: 1_800_000_000 }) },
      receivedAt: 3000
    });
    expect(added.runs.map(run => run.id)).toEqual(['run-2', 'run-1']);
  });

  it('keeps runs on screen while reconnecting and clears them when the kernel side is absent', () => {
    const connected = snapshot(INITIAL_STATE);
    const reconnecting = reduceRuns(connected, { type: 'connecting' });
    expect(reconnecting.connection).toBe('connecting');
    expect(reconnecting.runs).toHaveLength(1);
    const absent = reduceRuns(reconnecting, { type: 'absent' });
    expect(absent).toEqual({
      connection: 'absent',
      runs: [],
      cancelling: new Set(),
      approving: new Set(),
      errors: new Map()
    });
    expect(reduceRuns(absent, { type: 'no-kernel' })).toBe(INITIAL_STATE);
  });

  it('remembers a cancel request until the run stops', () => {
    const requested = reduceRuns(snapshot(INITIAL_STATE), {
      type: 'cancel-requested',
      runId: 'run-1'
    });
    expect(requested.cancelling.has('run-1')).toBe(true);
    const stillRunning = reduceRuns(requested, {
      type: 'message',
      message: { type: 'update', run: makeRun({ done: 3 }) },
      receivedAt: 2000
    });
    expect(stillRunning.cancelling.has('run-1')).toBe(true);
    const cancelled = reduceRuns(stillRunning, {
      type: 'message',
      message: { type: 'update', run: makeRun({ state: 'cancelled' }) },
      receivedAt: 3000
    });
    expect(cancelled.cancelling.size).toBe(0);
  });

  it(`keeps at most ${MAX_RUNS} runs`, () => {
    const runs = Array.from({ length: MAX_RUNS + 5 }, (_, i) =>
      makeRun({ id: `r${i}`, started_at: i, state: 'done' })
    );
    const state = snapshot(INITIAL_STATE, runs);
    expect(state.runs).toHaveLength(MAX_RUNS);
    expect(state.runs[0].id).toBe(`r${MAX_RUNS + 4}`);
  });
});

describe('statusText', () => {
  it('is null without active runs', () => {
    expect(statusText([])).toBeNull();
    expect(statusText([makeRun({ state: 'done' }), makeRun({ state: 'failed' })])).toBeNull();
  });

  it('sums running subtasks and progress over active runs', () => {
    const runs = [
      makeRun({ id: 'a', running: 8, done: 300, total: 600 }),
      makeRun({ id: 'b', running: 4, done: 40, total: 400 }),
      makeRun({ id: 'c', state: 'done', running: 0, done: 50, total: 50 })
    ];
    expect(statusText(runs)).toBe('APWA 12 running · 340/1000');
  });

  it('mentions failures, planning and approval', () => {
    expect(statusText([makeRun({ running: 1, done: 2, total: 4, failed: 1 })])).toBe(
      'APWA 1 running · 2/4 · 1 failed'
    );
    expect(statusText([makeRun({ state: 'planning', total: 0, running: 0 })])).toBe(
      'APWA planning'
    );
    expect(statusText([makeRun({ state: 'awaiting_approval', running: 0 })])).toBe(
      'APWA awaiting approval'
    );
  });
});

describe('formatting', () => {
  it('formats elapsed time', () => {
    expect(formatElapsed(0)).toBe('0s');
    expect(formatElapsed(42.9)).toBe('42s');
    expect(formatElapsed(185)).toBe('3m 05s');
    expect(formatElapsed(2 * 3600 + 7 * 60 + 3)).toBe('2h 07m');
  });

  it('extrapolates elapsed time only for active runs', () => {
    const running = { ...makeRun({ elapsed_s: 10 }), receivedAt: 1000 };
    expect(liveElapsed(running, 4000)).toBe(13);
    const done = { ...makeRun({ elapsed_s: 10, state: 'done' }), receivedAt: 1000 };
    expect(liveElapsed(done, 4000)).toBe(10);
  });

  it('formats tokens', () => {
    expect(formatTokens(950)).toBe('950');
    expect(formatTokens(1234)).toBe('1.2k');
    expect(formatTokens(12_345)).toBe('12k');
    expect(formatTokens(4_100_000)).toBe('4.1M');
  });

  it('formats progress', () => {
    expect(formatProgress({ done: 0, total: 0, failed: 0 })).toBe('');
    expect(formatProgress({ done: 340, total: 1000, failed: 0 })).toBe('340/1000');
    expect(formatProgress({ done: 340, total: 1000, failed: 3 })).toBe('340/1000 (+3 failed)');
    expect(progressFraction({ done: 3, total: 4, failed: 1 })).toBe(1);
    expect(progressFraction({ done: 1, total: 0, failed: 0 })).toBe(0);
  });
});

describe('promptLabels', () => {
  const base = 'For every row in {reviews}, classify the review as positive or negative';

  it('leaves prompts that differ early as they are', () => {
    const runs = [makeRun({ id: 'a', prompt: 'Summarise {df}' }), makeRun({ id: 'b', prompt: base })];
    expect(promptLabels(runs).get('a')).toBe('Summarise {df}');
    expect(promptLabels(runs).get('b')).toBe(base);
  });

  it('shows where variants of one prompt differ, which a cut-off start hides', () => {
    const runs = [
      makeRun({ id: 'a', prompt: `${base} and give a reason` }),
      makeRun({ id: 'b', prompt: `${base}, ignoring sarcasm` }),
      makeRun({ id: 'c', prompt: base })
    ];
    const labels = promptLabels(runs);
    const shown = runs.map(run => labels.get(run.id)!);
    expect(new Set(shown.map(label => label.slice(0, 30))).size).toBe(3);
    expect(shown[0]).toMatch(/^….*and give a reason$/);
    expect(shown[1]).toMatch(/^….*ignoring sarcasm$/);
    expect(shown[2]).toBe(base); // the original its variants extend reads from its start
  });

  it('compares the whole prompts when their first lines are the same', () => {
    const runs = [
      makeRun({ id: 'a', prompt: 'Label {df}', prompt_full: 'Label {df}\nUse three labels.' }),
      makeRun({ id: 'b', prompt: 'Label {df}', prompt_full: 'Label {df}\nUse five labels.' })
    ];
    const labels = promptLabels(runs);
    expect(labels.get('a')).toContain('three');
    expect(labels.get('b')).toContain('five');
  });

  it('keeps an exact repeat as it is', () => {
    const runs = [makeRun({ id: 'a', prompt: base }), makeRun({ id: 'b', prompt: base })];
    expect(promptLabels(runs).get('a')).toBe(base);
  });
});

describe('errors of runs', () => {
  it('keeps a refused approve next to its run until the run changes', () => {
    const state = snapshot(INITIAL_STATE, [makeRun({ state: 'awaiting_approval' })]);
    const refused = reduceRuns(state, {
      type: 'message',
      message: { type: 'error', run_id: 'run-1', message: 'a --dry-run' },
      receivedAt: 2000
    });
    expect(refused.errors.get('run-1')).toBe('a --dry-run');
    expect(refused.approving.size).toBe(0);
    const started = reduceRuns(refused, {
      type: 'message',
      message: { type: 'update', run: makeRun({ state: 'running' }) },
      receivedAt: 3000
    });
    expect(started.errors.has('run-1')).toBe(false);
  });

  it('marks a run approving until it leaves awaiting approval', () => {
    const state = snapshot(INITIAL_STATE, [makeRun({ state: 'awaiting_approval' })]);
    const approving = reduceRuns(state, { type: 'approve-requested', runId: 'run-1' });
    expect(approving.approving.has('run-1')).toBe(true);
    const running = reduceRuns(approving, {
      type: 'message',
      message: { type: 'update', run: makeRun({ state: 'running' }) },
      receivedAt: 3000
    });
    expect(running.approving.has('run-1')).toBe(false);
  });
});
