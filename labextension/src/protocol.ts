/**
 * The `apwa_runs` comm protocol, shared with `apwa_jupyter/runs_comm.py`.
 *
 * The frontend opens the comm; the kernel answers with a snapshot and then pushes
 * throttled updates. Everything that arrives from the kernel is validated here, so the
 * rest of the extension only sees well-formed values.
 */

/** Name of the comm target registered by the kernel side. */
export const COMM_TARGET = 'apwa_runs';

/**
 * The kernel's announcement that the target now exists (`%load_ext` ran): an
 * `update_display_data` on iopub with this display id, a display nobody has. Every client
 * ignores it by the protocol, so papermill and nbconvert log nothing and no output is saved
 * (a comm open made them log "No handler found for comm target"). Same value as
 * `HELLO_DISPLAY_ID` in `apwa_jupyter/runs_comm.py`.
 */
export const HELLO_DISPLAY_ID = 'apwa-runs-hello';

/** Whether an iopub message is the kernel's hello. */
export function isHello(msg: {
  header: { msg_type: string };
  content: unknown;
}): boolean {
  if (msg.header.msg_type !== 'update_display_data') {
    return false;
  }
  const transient = (msg.content as { transient?: { display_id?: unknown } } | null)?.transient;
  return transient?.display_id === HELLO_DISPLAY_ID;
}

export const RUN_STATES = [
  'planning',
  'awaiting_approval',
  'running',
  'done',
  'failed',
  'cancelled'
] as const;

export type RunState = (typeof RUN_STATES)[number];

/** States in which a run still makes progress and can be cancelled. */
export const ACTIVE_STATES: ReadonlySet<RunState> = new Set<RunState>([
  'planning',
  'awaiting_approval',
  'running'
]);

/** One run as the kernel describes it (`Run.summary()`). */
export interface RunSummary {
  id: string;
  prompt: string;
  state: RunState;
  done: number;
  total: number;
  failed: number;
  running: number;
  /** Null when not known: an earlier kernel's run whose record kept no token count. */
  tokens: number | null;
  elapsed_s: number;
  started_at: number;
  cell_id: string | null;
  out: string | null;
  error: string | null;
  /** The state in words ("done with 3 failed"); null from kernels that do not send it. */
  status: string | null;
  /** Subtasks that never ran (cancelled, stopped early, input failed upstream). */
  skipped: number;
  /** Stages that call tools with side effects (writes, deletes, sends). */
  side_effects: string[];
  /** The whole prompt (every line), for the hover; null from kernels that do not send it. */
  prompt_full: string | null;
  /** A run of an earlier kernel, listed from the result store. */
  earlier: boolean;
}

export interface SnapshotMessage {
  type: 'snapshot';
  runs: RunSummary[];
}

export interface UpdateMessage {
  type: 'update';
  run: RunSummary;
}

/** A request about a run was refused, e.g. approving a `--dry-run`. */
export interface ErrorMessage {
  type: 'error';
  run_id: string;
  message: string;
}

export type KernelMessage = SnapshotMessage | UpdateMessage | ErrorMessage;

export interface ListRequest {
  type: 'list';
}

export interface CancelRequest {
  type: 'cancel';
  run_id: string;
}

/** Approve a plan awaiting approval (the kernel calls `Run.start()`). */
export interface ApproveRequest {
  type: 'approve';
  run_id: string;
}

export type FrontendMessage = ListRequest | CancelRequest | ApproveRequest;

export function isActiveState(state: RunState): boolean {
  return ACTIVE_STATES.has(state);
}

type Json = { [key: string]: unknown };

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isRunState(value: unknown): value is RunState {
  return typeof value === 'string' && (RUN_STATES as readonly string[]).includes(value);
}

function count(value: unknown): number {
  return typeof value === 'number' && Number.isFinite(value) && value > 0 ? value : 0;
}

function optionalString(value: unknown): string | null {
  return typeof value === 'string' ? value : null;
}

/** Validate one RunSummary; unknown extra fields are dropped, missing counters become 0. */
export function parseRunSummary(value: unknown): RunSummary | null {
  if (!isObject(value) || typeof value.id !== 'string' || !isRunState(value.state)) {
    return null;
  }
  return {
    id: value.id,
    prompt: typeof value.prompt === 'string' ? value.prompt : '',
    state: value.state,
    done: count(value.done),
    total: count(value.total),
    failed: count(value.failed),
    running: count(value.running),
    tokens: value.tokens === null ? null : count(value.tokens),
    elapsed_s: count(value.elapsed_s),
    started_at: count(value.started_at),
    cell_id: optionalString(value.cell_id),
    out: optionalString(value.out),
    error: optionalString(value.error),
    status: optionalString(value.status),
    skipped: count(value.skipped),
    side_effects: Array.isArray(value.side_effects)
      ? value.side_effects.filter((s): s is string => typeof s === 'string')
      : [],
    prompt_full: optionalString(value.prompt_full),
    earlier: value.earlier === true
  };
}

/** Validate a kernel → frontend message; returns null for anything not in the protocol. */
export function parseKernelMessage(data: unknown): KernelMessage | null {
  if (!isObject(data)) {
    return null;
  }
  if (data.type === 'snapshot' && Array.isArray(data.runs)) {
    const runs = data.runs
      .map(parseRunSummary)
      .filter((run): run is RunSummary => run !== null);
    return { type: 'snapshot', runs };
  }
  if (data.type === 'update') {
    const run = parseRunSummary(data.run);
    return run === null ? null : { type: 'update', run };
  }
  if (data.type === 'error' && typeof data.run_id === 'string') {
    const message = typeof data.message === 'string' ? data.message : 'refused';
    return { type: 'error', run_id: data.run_id, message };
  }
  return null;
}
