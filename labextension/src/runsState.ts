/**
 * The runs of one kernel as the frontend knows them: a pure reducer plus the
 * formatting helpers the panel and the status bar share. No DOM, no JupyterLab.
 */

import { isActiveState, KernelMessage, RunState, RunSummary } from './protocol';

/**
 * Where the comm with the kernel stands.
 *
 * - `no-kernel`: the notebook has no kernel (or there is no notebook);
 * - `connecting`: the comm was opened and the kernel has not answered yet;
 * - `absent`: the kernel closed the comm: `%load_ext apwa_jupyter` has not run there;
 * - `connected`: a snapshot arrived; updates follow.
 */
export type ConnectionStatus = 'no-kernel' | 'connecting' | 'absent' | 'connected';

/** A run plus the moment (ms since epoch) its latest summary arrived. */
export interface TrackedRun extends RunSummary {
  receivedAt: number;
}

export interface RunsState {
  readonly connection: ConnectionStatus;
  /** Newest first. */
  readonly runs: readonly TrackedRun[];
  /** Runs whose cancel was sent and which have not stopped yet. */
  readonly cancelling: ReadonlySet<string>;
  /** Runs whose approve was sent and which still await approval. */
  readonly approving: ReadonlySet<string>;
  /** Why the kernel refused a request about a run (shown on its row until it changes). */
  readonly errors: ReadonlyMap<string, string>;
}

export type RunsAction =
  | { type: 'no-kernel' }
  | { type: 'connecting' }
  | { type: 'absent' }
  | { type: 'message'; message: KernelMessage; receivedAt: number }
  | { type: 'cancel-requested'; runId: string }
  | { type: 'approve-requested'; runId: string };

/** The panel keeps this many runs per kernel; older finished ones are dropped. */
export const MAX_RUNS = 200;

export const INITIAL_STATE: RunsState = {
  connection: 'no-kernel',
  runs: [],
  cancelling: new Set(),
  approving: new Set(),
  errors: new Map()
};

function newestFirst(a: TrackedRun, b: TrackedRun): number {
  if (a.started_at !== b.started_at) {
    return b.started_at - a.started_at;
  }
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
}

function keepActiveCancels(
  cancelling: ReadonlySet<string>,
  runs: readonly TrackedRun[]
): ReadonlySet<string> {
  if (cancelling.size === 0) {
    return cancelling;
  }
  const stillActive = new Set(runs.filter(run => isActiveState(run.state)).map(run => run.id));
  return new Set([...cancelling].filter(id => stillActive.has(id)));
}

function keepAwaiting(
  approving: ReadonlySet<string>,
  runs: readonly TrackedRun[]
): ReadonlySet<string> {
  if (approving.size === 0) {
    return approving;
  }
  const waiting = new Set(runs.filter(r => r.state === 'awaiting_approval').map(r => r.id));
  return new Set([...approving].filter(id => waiting.has(id)));
}

/** A refusal stays next to its run while the run is as it was when refused. */
function keepErrors(
  errors: ReadonlyMap<string, string>,
  before: readonly TrackedRun[],
  after: readonly TrackedRun[]
): ReadonlyMap<string, string> {
  if (errors.size === 0) {
    return errors;
  }
  const stateBefore = new Map(before.map(run => [run.id, run.state]));
  const kept = new Map<string, string>();
  for (const run of after) {
    const error = errors.get(run.id);
    if (error !== undefined && stateBefore.get(run.id) === run.state) {
      kept.set(run.id, error);
    }
  }
  return kept;
}

function withRuns(state: RunsState, runs: TrackedRun[]): RunsState {
  const sorted = runs.sort(newestFirst).slice(0, MAX_RUNS);
  return {
    connection: 'connected',
    runs: sorted,
    cancelling: keepActiveCancels(state.cancelling, sorted),
    approving: keepAwaiting(state.approving, sorted),
    errors: keepErrors(state.errors, state.runs, sorted)
  };
}

/** Apply one event to the state; never mutates its arguments. */
export function reduceRuns(state: RunsState, action: RunsAction): RunsState {
  switch (action.type) {
    case 'no-kernel':
      return INITIAL_STATE;
    case 'connecting':
      // Keep the runs on screen while reconnecting; a snapshot replaces them.
      return { ...state, connection: 'connecting' };
    case 'absent':
      return { ...INITIAL_STATE, connection: 'absent' };
    case 'cancel-requested':
      return { ...state, cancelling: new Set([...state.cancelling, action.runId]) };
    case 'approve-requested': {
      const errors = new Map(state.errors);
      errors.delete(action.runId);
      return { ...state, approving: new Set([...state.approving, action.runId]), errors };
    }
    case 'message': {
      const { message, receivedAt } = action;
      if (message.type === 'error') {
        const approving = new Set(state.approving);
        approving.delete(message.run_id);
        const errors = new Map(state.errors).set(message.run_id, message.message);
        return { ...state, approving, errors };
      }
      if (message.type === 'snapshot') {
        return withRuns(
          state,
          message.runs.map(run => ({ ...run, receivedAt }))
        );
      }
      const others = state.runs.filter(run => run.id !== message.run.id);
      return withRuns(state, [...others, { ...message.run, receivedAt }]);
    }
  }
}

export function activeRuns(runs: readonly RunSummary[]): RunSummary[] {
  return runs.filter(run => isActiveState(run.state));
}

/** Elapsed seconds, extrapolated from the last summary while the run is active. */
export function liveElapsed(run: TrackedRun, nowMs: number): number {
  if (!isActiveState(run.state)) {
    return run.elapsed_s;
  }
  return run.elapsed_s + Math.max(0, nowMs - run.receivedAt) / 1000;
}

export const STATE_LABELS: Readonly<Record<RunState, string>> = {
  planning: 'planning',
  awaiting_approval: 'awaiting approval',
  running: 'running',
  done: 'done',
  failed: 'failed',
  cancelled: 'cancelled'
};

/** `42s`, `3m 05s`, `2h 07m`. */
export function formatElapsed(seconds: number): string {
  const total = Math.max(0, Math.floor(seconds));
  if (total < 60) {
    return `${total}s`;
  }
  const pad = (n: number): string => String(n).padStart(2, '0');
  if (total < 3600) {
    return `${Math.floor(total / 60)}m ${pad(total % 60)}s`;
  }
  return `${Math.floor(total / 3600)}h ${pad(Math.floor((total % 3600) / 60))}m`;
}

/**
 * What to show of each run's prompt in a narrow list, by run id.
 *
 * Variants of one prompt (rerun with a word changed) share a long start, and a row cut at
 * about 35 characters made them look identical. Where a prompt shares more than
 * `SHARED_SHOWN_UP_TO` characters with another listed prompt, the label starts a few words
 * before the first difference, after an ellipsis; prompts are compared whole (every line),
 * so variants differing only on a later line are told apart too. The whole prompt stays in
 * the row's hover.
 */
export function promptLabels(
  runs: readonly Pick<RunSummary, 'id' | 'prompt' | 'prompt_full'>[]
): Map<string, string> {
  const flat = runs.map(run => (run.prompt_full ?? run.prompt).replace(/\s+/g, ' ').trim());
  const labels = new Map<string, string>();
  runs.forEach((run, i) => {
    let shared = 0;
    let sameFirstLine = false;
    flat.forEach((other, j) => {
      if (j !== i && other !== flat[i]) {
        shared = Math.max(shared, commonPrefix(flat[i], other));
        sameFirstLine = sameFirstLine || runs[j].prompt === run.prompt;
      }
    });
    // A prompt the others extend (the original of its variants) reads best from its start.
    if (shared <= SHARED_SHOWN_UP_TO || shared >= flat[i].length) {
      labels.set(run.id, sameFirstLine ? flat[i] : run.prompt);
      return;
    }
    labels.set(run.id, `…${flat[i].slice(wordStartBefore(flat[i], shared - CONTEXT_CHARS))}`);
  });
  return labels;
}

/** Characters of a prompt a panel row shows for sure before its ellipsis. */
export const SHARED_SHOWN_UP_TO = 24;
/** Characters of the shared start kept before the first difference, for context. */
const CONTEXT_CHARS = 12;

function commonPrefix(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) {
    i++;
  }
  return i;
}

function wordStartBefore(text: string, position: number): number {
  let i = Math.max(0, Math.min(position, text.length));
  while (i > 0 && text[i - 1] !== ' ') {
    i--;
  }
  return i;
}

/** `950`, `12.3k`, `4.1M` tokens. */
export function formatTokens(tokens: number): string {
  if (tokens < 1000) {
    return String(Math.round(tokens));
  }
  if (tokens < 1_000_000) {
    return `${(tokens / 1000).toFixed(tokens < 10_000 ? 1 : 0)}k`;
  }
  return `${(tokens / 1_000_000).toFixed(1)}M`;
}

/** `340/1000`, `340/1000 (+3 failed)`; empty before the plan has subtasks. */
export function formatProgress(run: Pick<RunSummary, 'done' | 'total' | 'failed'>): string {
  if (run.total <= 0 && run.done <= 0) {
    return '';
  }
  const base = `${run.done}/${run.total}`;
  return run.failed > 0 ? `${base} (+${run.failed} failed)` : base;
}

/** Fraction of subtasks finished (done or failed), 0..1. */
export function progressFraction(run: Pick<RunSummary, 'done' | 'total' | 'failed'>): number {
  if (run.total <= 0) {
    return 0;
  }
  return Math.min(1, (run.done + run.failed) / run.total);
}

/**
 * Status bar text while runs are active, e.g. `APWA 12 running · 340/1000`;
 * null when nothing is active (the item hides).
 */
export function statusText(runs: readonly RunSummary[]): string | null {
  const active = activeRuns(runs);
  if (active.length === 0) {
    return null;
  }
  const sum = (key: 'done' | 'total' | 'failed' | 'running'): number =>
    active.reduce((acc, run) => acc + run[key], 0);
  const parts: string[] = [];
  if (active.some(run => run.state === 'running')) {
    parts.push(`${sum('running')} running`);
    const total = sum('total');
    if (total > 0) {
      parts.push(`${sum('done')}/${total}`);
    }
    const failed = sum('failed');
    if (failed > 0) {
      parts.push(`${failed} failed`);
    }
  } else if (active.some(run => run.state === 'awaiting_approval')) {
    parts.push('awaiting approval');
  } else {
    parts.push('planning');
  }
  return `APWA ${parts.join(' · ')}`;
}
