/**
 * One kernel's end of the `apwa_runs` comm: opens it, keeps a RunsState up to date and
 * sends `list` / `cancel`. Knows nothing about notebooks or widgets.
 */

import type { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { COMM_TARGET, FrontendMessage, parseKernelMessage } from './protocol';
import { INITIAL_STATE, reduceRuns, RunsAction, RunsState } from './runsState';

/** How long to wait for the comm's subshell before opening on the main shell anyway. */
export const SUBSHELL_WAIT_MS = 5000;

/** Kernel → frontend announcement sent by `runs_comm.register`: the target now exists. */
export const HELLO_TYPE = 'hello';

type CommTargetCallback = (comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg) => void;

export interface IKernelRunsOptions {
  /** Clock in ms since epoch; tests pass a fake one. */
  now?: () => number;
  subshellWaitMs?: number;
}

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

export class KernelRuns {
  constructor(
    readonly kernel: Kernel.IKernelConnection,
    options: IKernelRunsOptions = {}
  ) {
    this._now = options.now ?? Date.now;
    this._subshellWaitMs = options.subshellWaitMs ?? SUBSHELL_WAIT_MS;
    kernel.registerCommTarget(COMM_TARGET, this._onHello);
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
    if (this._isDisposed || this.kernel.isDisposed) {
      return;
    }
    this._dropComm();
    const generation = ++this._generation;
    this._dispatch({ type: 'connecting' });
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
      if (this._comm === comm) {
        this._comm = null;
        this._dispatch({ type: 'absent' });
      }
    };
    await waitForCommSubshell(this.kernel, comm, this._subshellWaitMs);
    if (generation !== this._generation || comm.isDisposed || this._isDisposed) {
      return;
    }
    try {
      comm.open({ type: 'list' });
    } catch (reason) {
      console.warn('apwa-jupyter: cannot open the runs comm', reason);
      this._comm = null;
      this._dispatch({ type: 'absent' });
    }
  }

  /** Ask the kernel to cancel a run; its next update shows the result. */
  cancel(runId: string): void {
    if (this._send({ type: 'cancel', run_id: runId })) {
      this._dispatch({ type: 'cancel-requested', runId });
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
    if (!this.kernel.isDisposed) {
      this.kernel.removeCommTarget(COMM_TARGET, this._onHello);
    }
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

  /** The kernel announces (by opening a comm to us) that the extension was just loaded. */
  private _onHello: CommTargetCallback = (_comm, msg) => {
    const data = msg.content.data as { type?: unknown } | undefined;
    if (data?.type === HELLO_TYPE && this._state.connection !== 'connected') {
      void this.connect();
    }
  };

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
    if (comm !== null && !comm.isDisposed && !this.kernel.isDisposed) {
      try {
        comm.close();
      } catch {
        // The kernel went away; nothing to close.
      }
    }
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
  private _isDisposed = false;
  private _restart: 'none' | 'waiting-for-start' | 'waiting-for-idle' = 'none';
  private _state: RunsState = INITIAL_STATE;
  private readonly _now: () => number;
  private readonly _subshellWaitMs: number;
  private readonly _stateChanged = new Signal<this, RunsState>(this);
}
