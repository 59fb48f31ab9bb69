/**
 * One kernel's end of the `apwa_runs` comm: opens it, keeps a RunsState up to date and
 * sends `list` / `cancel` / `approve`. Knows nothing about notebooks or widgets.
 *
 * Opening is careful about JupyterLab's per-comm-target subshells (ipykernel >= 7): a comm
 * closed while its subshell is still being created leaves JupyterLab deleting that subshell
 * after handing it to the next comm of the same target, whose open then goes to a subshell
 * the kernel no longer has (the kernel logs "Unknown subshell_id" and the open is never
 * answered). That is what Restart Kernel and Run All Cells did: the panel's open after the
 * restart was under way when `%load_ext`'s hello arrived, the panel started over, and it
 * stayed on "Waiting for the kernel..." for good. So a hello never interrupts an open under
 * way, a new comm is created only once the dropped one's subshell is released, and an open
 * the kernel handled without answering is retried a few times.
 */

import type { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { COMM_TARGET, FrontendMessage, isHello, parseKernelMessage } from './protocol';
import { INITIAL_STATE, reduceRuns, RunsAction, RunsState } from './runsState';

/** How long to wait for the comm's subshell before opening on the main shell anyway. */
export const SUBSHELL_WAIT_MS = 5000;

/**
 * After the kernel has handled the open (its idle status for the comm_open came), how long
 * to wait for the snapshot or the close before taking the open as lost. The kernel sends
 * either before that status, so this only absorbs message handling on our side.
 */
export const LOST_OPEN_GRACE_MS = 500;

/** Pause before opening again after a lost open. */
export const REOPEN_DELAY_MS = 250;

/** Opens tried in a row without an answer before the panel gives up (a hello or a refresh
 * starts again). */
export const MAX_SILENT_OPENS = 3;

export interface IKernelRunsOptions {
  /** Clock in ms since epoch; tests pass a fake one. */
  now?: () => number;
  subshellWaitMs?: number;
  lostOpenGraceMs?: number;
  reopenDelayMs?: number;
}

type Future = { done?: Promise<unknown> } | undefined | void;

function delay(ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms));
}

/**
 * Wait until the comm runs on its own kernel subshell, when kernel and JupyterLab support
 * it (ipykernel >= 7, JupyterLab >= 4.4). Comm messages then reach the kernel while a cell
 * is still executing, which is what makes "cancel" work during a blocking `%%apwa` cell.
 */
async function waitForCommSubshell(
  kernel: Kernel.IKernelConnection,
  comm: Kernel.IComm,
  timeoutMs: number
): Promise<void> {
  const started = (comm as { subshellStarted?: Promise<void> }).subshellStarted;
  if (started === undefined || comm.commsOverSubshells === 'disabled') {
    return;
  }
  try {
    await Promise.race([kernel.info, delay(timeoutMs)]);
  } catch {
    return;
  }
  if (!(kernel as { supportsSubshells?: boolean }).supportsSubshells) {
    return;
  }
  await Promise.race([started.catch(() => undefined), delay(timeoutMs)]);
}

/**
 * Resolve once JupyterLab is done with a dropped comm's subshell: its creation finished (so
 * the close's deletion of it has been sent and JupyterLab forgot it) or timed out.
 */
async function releaseSubshell(comm: Kernel.IComm, timeoutMs: number): Promise<void> {
  const started = (comm as { subshellStarted?: Promise<void> }).subshellStarted;
  if (started !== undefined && comm.commsOverSubshells !== 'disabled') {
    await Promise.race([started.catch(() => undefined), delay(timeoutMs)]);
  }
  await delay(0); // the close's own continuation runs before the next comm looks it up
}

export class KernelRuns {
  constructor(
    readonly kernel: Kernel.IKernelConnection,
    options: IKernelRunsOptions = {}
  ) {
    this._now = options.now ?? Date.now;
    this._subshellWaitMs = options.subshellWaitMs ?? SUBSHELL_WAIT_MS;
    this._lostOpenGraceMs = options.lostOpenGraceMs ?? LOST_OPEN_GRACE_MS;
    this._reopenDelayMs = options.reopenDelayMs ?? REOPEN_DELAY_MS;
    kernel.iopubMessage.connect(this._onIopub, this);
    kernel.statusChanged.connect(this._onStatus, this);
    kernel.connectionStatusChanged.connect(this._onConnection, this);
    kernel.disposed.connect(this.dispose, this);
  }

  get state(): RunsState {
    return this._state;
  }

  /** Emits the new state after every change. */
  get stateChanged(): ISignal<this, RunsState> {
    return this._stateChanged;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Open (or reopen) the comm and ask for a snapshot. */
  async connect(): Promise<void> {
    this._silentOpens = 0;
    return this._open();
  }

  private async _open(): Promise<void> {
    if (this._isDisposed || this.kernel.isDisposed) {
      return;
    }
    this._dropComm();
    const generation = ++this._generation;
    this._helloPending = false;
    this._dispatch({ type: 'connecting' });
    await this._released;
    if (generation !== this._generation || this._isDisposed || this.kernel.isDisposed) {
      return;
    }
    let comm: Kernel.IComm;
    try {
      comm = this.kernel.createComm(COMM_TARGET);
    } catch (reason) {
      console.warn('apwa-jupyter: cannot open the runs comm', reason);
      this._dispatch({ type: 'absent' });
      return;
    }
    this._comm = comm;
    comm.onMsg = msg => {
      if (this._comm === comm) {
        this._onCommData(msg.content.data);
      }
    };
    comm.onClose = () => {
      if (this._comm !== comm) {
        return;
      }
      this._comm = null;
      if (this._helloPending) {
        // The open reached the kernel before `%load_ext` registered the target, whose
        // hello came meanwhile: the target exists now.
        void this.connect();
        return;
      }
      this._dispatch({ type: 'absent' });
    };
    await waitForCommSubshell(this.kernel, comm, this._subshellWaitMs);
    if (generation !== this._generation || comm.isDisposed || this._isDisposed) {
      return;
    }
    let future: Future;
    try {
      future = comm.open({ type: 'list' });
    } catch (reason) {
      console.warn('apwa-jupyter: cannot open the runs comm', reason);
      this._comm = null;
      this._dispatch({ type: 'absent' });
      return;
    }
    this._expectAnswer(comm, generation, future);
  }

  /**
   * The kernel answers an open with a snapshot or a close before it reports the open handled;
   * an open handled without either went nowhere (a subshell the kernel does not have): open
   * again, a few times.
   */
  private _expectAnswer(comm: Kernel.IComm, generation: number, future: Future): void {
    const done = future ? future.done : undefined;
    if (done === undefined) {
      return;
    }
    const stillSilent = (): boolean =>
      generation === this._generation &&
      this._comm === comm &&
      !this._isDisposed &&
      this._state.connection === 'connecting';
    void done
      .catch(() => undefined)
      .then(() => delay(this._lostOpenGraceMs))
      .then(async () => {
        if (!stillSilent()) {
          return;
        }
        this._silentOpens++;
        if (this._silentOpens >= MAX_SILENT_OPENS) {
          console.warn(`apwa-jupyter: the kernel answered none of ${this._silentOpens} opens`);
          this._dropComm();
          this._dispatch({ type: 'absent' });
          return;
        }
        console.warn('apwa-jupyter: the runs comm open went unanswered; opening again');
        await delay(this._reopenDelayMs);
        if (stillSilent()) {
          void this._open();
        }
      });
  }

  /** Ask the kernel to cancel a run; its next update shows the result. */
  cancel(runId: string): void {
    if (this._send({ type: 'cancel', run_id: runId })) {
      this._dispatch({ type: 'cancel-requested', runId });
    }
  }

  /** Ask the kernel to start a plan awaiting approval (the widget's Run, `%apwa approve`). */
  approve(runId: string): void {
    if (this._send({ type: 'approve', run_id: runId })) {
      this._dispatch({ type: 'approve-requested', runId });
    }
  }

  /** Ask for a fresh snapshot. */
  refresh(): void {
    if (this._comm === null) {
      void this.connect();
      return;
    }
    this._send({ type: 'list' });
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._generation++;
    this._dropComm();
    Signal.clearData(this);
  }

  private _send(message: FrontendMessage): boolean {
    const comm = this._comm;
    if (comm === null || comm.isDisposed || this._state.connection !== 'connected') {
      return false;
    }
    try {
      comm.send({ ...message });
      return true;
    } catch (reason) {
      console.warn('apwa-jupyter: cannot send on the runs comm', reason);
      return false;
    }
  }

  private _onCommData(data: unknown): void {
    const message = parseKernelMessage(data);
    if (message === null) {
      console.warn('apwa-jupyter: ignoring an unknown runs message', data);
      return;
    }
    this._dispatch({ type: 'message', message, receivedAt: this._now() });
  }

  /** The kernel announces (see `isHello`) that the extension was just loaded. */
  private _onIopub(_kernel: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    if (!isHello(msg) || this._state.connection === 'connected') {
      return;
    }
    if (this._comm !== null && this._state.connection === 'connecting') {
      // An open is under way: let it finish (see the module comment); if the kernel
      // closes it because it came before the target, `onClose` opens again.
      this._helloPending = true;
      return;
    }
    void this.connect();
  }

  /**
   * Reopen after a restart once the new kernel is up: `restarting` may be followed by a
   * stale `idle` of the old kernel, so wait for `starting` and then `idle`.
   */
  private _onStatus(_kernel: Kernel.IKernelConnection, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting') {
      this._restart = 'waiting-for-start';
      this._dropComm();
      this._dispatch({ type: 'connecting' });
    } else if (status === 'dead') {
      this._restart = 'none';
      this._dropComm();
      this._dispatch({ type: 'no-kernel' });
    } else if (status === 'starting' && this._restart === 'waiting-for-start') {
      this._restart = 'waiting-for-idle';
    } else if (status === 'idle' && this._restart === 'waiting-for-idle') {
      this._restart = 'none';
      void this.connect();
    }
  }

  /**
   * A restart on a loaded machine can drop the websocket: JupyterLab reconnects and the new
   * kernel reports `idle` without the `starting` we wait for (seen in CI). Once the connection
   * is back, the restart is over whatever statuses were missed.
   */
  private _onConnection(
    _kernel: Kernel.IKernelConnection,
    status: Kernel.ConnectionStatus
  ): void {
    if (status === 'connected' && this._restart !== 'none') {
      this._restart = 'none';
      void this.connect();
    }
  }

  private _dropComm(): void {
    const comm = this._comm;
    this._comm = null;
    if (comm === null) {
      return;
    }
    if (!comm.isDisposed && !this.kernel.isDisposed) {
      try {
        comm.close();
      } catch {
        // The kernel went away; nothing to close.
      }
    }
    const previous = this._released;
    this._released = previous.then(() => releaseSubshell(comm, this._subshellWaitMs));
  }

  private _dispatch(action: RunsAction): void {
    const next = reduceRuns(this._state, action);
    if (next !== this._state) {
      this._state = next;
      this._stateChanged.emit(next);
    }
  }

  private _comm: Kernel.IComm | null = null;
  private _generation = 0;
  private _helloPending = false;
  private _released: Promise<void> = Promise.resolve();
  private _silentOpens = 0;
  private readonly _lostOpenGraceMs: number;
  private readonly _reopenDelayMs: number;
  private _isDisposed = false;
  private _restart: 'none' | 'waiting-for-start' | 'waiting-for-idle' = 'none';
  private _state: RunsState = INITIAL_STATE;
  private readonly _now: () => number;
  private readonly _subshellWaitMs: number;
  private readonly _stateChanged = new Signal<this, RunsState>(this);
}
