import type { Kernel } from '@jupyterlab/services';
import { Signal } from '@lumino/signaling';

import { KernelRuns } from '../kernelRuns';
import { COMM_TARGET } from '../protocol';
import { makeRun } from './fixtures';


class FakeComm {
  constructor(readonly targetName: string) {}
  readonly commId = `comm-${Math.random()}`;
  isDisposed = false;
  commsOverSubshells: string | undefined = undefined;
  subshellStarted: Promise<void> | undefined = undefined;
  onMsg: (msg: { content: { data: unknown } }) => void = () => undefined;
  onClose: (msg: unknown) => void = () => undefined;
  readonly opened: unknown[] = [];
  readonly sent: unknown[] = [];
  closedByFrontend = false;
  /** Resolves the `done` of the open's future: the kernel has handled the comm_open. */
  handled: () => void = () => undefined;
  /** Rejects it: the message was dropped (e.g. a restart cleared it). */
  dropped: (reason: unknown) => void = () => undefined;

  open(data: unknown): { done: Promise<unknown> } {
    this.opened.push(data);
    const done = new Promise<unknown>((resolve, reject) => {
      this.handled = () => resolve(undefined);
      this.dropped = reject;
    });
    return { done };
  }
  send(data: unknown): { done: Promise<unknown> } {
    this.sent.push(data);
    return { done: Promise.resolve(undefined) };
  }
  close(): void {
    this.closedByFrontend = true;
    this.isDisposed = true;
    this.onClose({});
  }
  /** The kernel sends a comm_msg. */
  receive(data: unknown): void {
    this.onMsg({ content: { data } });
  }
  /** The kernel closes the comm (e.g. the target is not registered). */
  closedByKernel(): void {
    this.isDisposed = true;
    this.onClose({});
  }
}

class FakeKernel {
  isDisposed = false;
  supportsSubshells = false;
  info: Promise<unknown> = Promise.resolve({});
  readonly statusChanged = new Signal<this, Kernel.Status>(this);
  readonly connectionStatusChanged = new Signal<this, Kernel.ConnectionStatus>(this);
  readonly disposed = new Signal<this, void>(this);
  readonly iopubMessage = new Signal<this, unknown>(this);
  readonly comms: FakeComm[] = [];
  /** Applied to each new comm, to simulate JupyterLab's subshell support. */
  prepareComm: (comm: FakeComm) => void = () => undefined;

  createComm(target: string): FakeComm {
    const comm = new FakeComm(target);
    this.prepareComm(comm);
    this.comms.push(comm);
    return comm;
  }
  get lastComm(): FakeComm {
    return this.comms[this.comms.length - 1];
  }
}

const flush = (): Promise<void> => new Promise(resolve => setTimeout(resolve, 0));
const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms));

/** Wait until `condition()` holds (timers here are real: a loaded machine is slower). */
async function until(condition: () => boolean, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error('condition not met in time');
    }
    await sleep(5);
  }
}

function setup(): { kernel: FakeKernel; runs: KernelRuns } {
  const kernel = new FakeKernel();
  const runs = new KernelRuns(kernel as unknown as Kernel.IKernelConnection, {
    now: () => 5000,
    subshellWaitMs: 50,
    lostOpenGraceMs: 10,
    reopenDelayMs: 5
  });
  return { kernel, runs };
}

/** Comms whose subshell starts only when the test says so (JupyterLab with ipykernel 7). */
function withSubshells(kernel: FakeKernel): Array<() => void> {
  const starts: Array<() => void> = [];
  kernel.supportsSubshells = true;
  kernel.prepareComm = comm => {
    comm.commsOverSubshells = 'perCommTarget';
    comm.subshellStarted = new Promise<void>(resolve => starts.push(resolve));
  };
  return starts;
}

/** What `runs_comm._announce` sends: an update of a display nobody has. */
const hello = (kernel: FakeKernel): void =>
  kernel.iopubMessage.emit({
    header: { msg_type: 'update_display_data' },
    content: { data: {}, metadata: {}, transient: { display_id: 'apwa-runs-hello' } }
  });

describe('KernelRuns', () => {
  it('opens the comm with a list request and applies the snapshot', async () => {
    const { kernel, runs } = setup();
    const states: string[] = [];
    runs.stateChanged.connect((_, state) => states.push(state.connection));
    await runs.connect();
    expect(kernel.lastComm.targetName).toBe(COMM_TARGET);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
    expect(runs.state.connection).toBe('connecting');

    kernel.lastComm.receive({ type: 'snapshot', runs: [makeRun()] });
    expect(runs.state.connection).toBe('connected');
    expect(runs.state.runs[0]).toMatchObject({ id: 'run-1', receivedAt: 5000 });

    kernel.lastComm.receive({ type: 'update', run: makeRun({ state: 'done', done: 10 }) });
    expect(runs.state.runs[0].state).toBe('done');
    expect(states).toEqual(['connecting', 'connected', 'connected']);
  });

  it('shows the kernel side as absent when the kernel closes the comm', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    kernel.lastComm.closedByKernel();
    expect(runs.state.connection).toBe('absent');
  });

  it('ignores messages outside the protocol', async () => {
    const { kernel, runs } = setup();
    const warn = jest.spyOn(console, 'warn').mockImplementation(() => undefined);
    await runs.connect();
    kernel.lastComm.receive({ type: 'mystery' });
    expect(runs.state.connection).toBe('connecting');
    expect(warn).toHaveBeenCalled();
    warn.mockRestore();
  });

  it('reconnects when the kernel announces the extension was loaded', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    kernel.lastComm.closedByKernel();
    // Another display's update is not a hello.
    kernel.iopubMessage.emit({
      header: { msg_type: 'update_display_data' },
      content: { data: {}, metadata: {}, transient: { display_id: 'someone-else' } }
    });
    await flush();
    expect(kernel.comms).toHaveLength(1);
    hello(kernel);
    await flush();
    expect(kernel.comms).toHaveLength(2);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
  });

  it('sends cancel requests and marks the run as cancelling', async () => {
    const { kernel, runs } = setup();
    runs.cancel('run-1');
    expect(runs.state.cancelling.size).toBe(0);

    await runs.connect();
    kernel.lastComm.receive({ type: 'snapshot', runs: [makeRun()] });
    runs.cancel('run-1');
    expect(kernel.lastComm.sent).toEqual([{ type: 'cancel', run_id: 'run-1' }]);
    expect(runs.state.cancelling.has('run-1')).toBe(true);
  });

  it('sends approve requests for a run awaiting approval', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    kernel.lastComm.receive({ type: 'snapshot', runs: [makeRun({ state: 'awaiting_approval' })] });
    runs.approve('run-1');
    expect(kernel.lastComm.sent).toEqual([{ type: 'approve', run_id: 'run-1' }]);
    expect(runs.state.approving.has('run-1')).toBe(true);
    kernel.lastComm.receive({ type: 'error', run_id: 'run-1', message: 'a --dry-run' });
    expect(runs.state.errors.get('run-1')).toBe('a --dry-run');
    expect(runs.state.approving.has('run-1')).toBe(false);
  });

  it('reopens the comm after a kernel restart', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    const first = kernel.lastComm;
    first.receive({ type: 'snapshot', runs: [makeRun()] });

    kernel.statusChanged.emit('restarting');
    expect(first.closedByFrontend).toBe(true);
    expect(runs.state.connection).toBe('connecting');
    kernel.statusChanged.emit('idle'); // a late status of the old kernel
    await flush();
    expect(kernel.comms).toHaveLength(1);
    kernel.statusChanged.emit('unknown');
    kernel.statusChanged.emit('starting');
    kernel.statusChanged.emit('idle');
    await flush();
    expect(kernel.comms).toHaveLength(2);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
    // An ordinary busy/idle cycle does not reopen.
    kernel.statusChanged.emit('busy');
    kernel.statusChanged.emit('idle');
    await flush();
    expect(kernel.comms).toHaveLength(2);
  });

  it('reopens after a restart that lost the websocket and never said starting', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    kernel.statusChanged.emit('restarting');
    kernel.connectionStatusChanged.emit('connecting');
    kernel.statusChanged.emit('idle'); // the new kernel, but no 'starting' was seen
    await flush();
    expect(kernel.comms).toHaveLength(1);
    kernel.connectionStatusChanged.emit('connected');
    await flush();
    expect(kernel.comms).toHaveLength(2);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
    // Reconnections outside a restart do not reopen.
    kernel.connectionStatusChanged.emit('connected');
    await flush();
    expect(kernel.comms).toHaveLength(2);
  });

  it('waits for the comm subshell before opening, when the kernel supports subshells', async () => {
    const { kernel, runs } = setup();
    kernel.supportsSubshells = true;
    let startSubshell: () => void = () => undefined;
    kernel.prepareComm = comm => {
      comm.commsOverSubshells = 'perCommTarget';
      comm.subshellStarted = new Promise<void>(resolve => (startSubshell = resolve));
    };
    const connecting = runs.connect();
    await flush();
    expect(kernel.lastComm.opened).toEqual([]);
    startSubshell();
    await connecting;
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
  });

  it('opens on the main shell when the subshell never starts', async () => {
    const { kernel, runs } = setup();
    kernel.supportsSubshells = true;
    kernel.prepareComm = comm => {
      comm.commsOverSubshells = 'perCommTarget';
      comm.subshellStarted = new Promise<void>(() => undefined);
    };
    await runs.connect();
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
  });

  it('keeps the open under way when the hello comes meanwhile (Restart and Run All)', async () => {
    // Dropping a comm whose subshell JupyterLab is still creating, then opening another at
    // once, made JupyterLab give the new comm the subshell it was deleting: the open went to a
    // subshell the kernel no longer had and the panel waited for good.
    const { kernel, runs } = setup();
    const starts = withSubshells(kernel);
    const connecting = runs.connect();
    await flush();
    hello(kernel); // %load_ext ran while the subshell was being created
    await flush();
    expect(kernel.comms).toHaveLength(1);
    expect(kernel.lastComm.closedByFrontend).toBe(false);
    starts[0]();
    await connecting;
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
    kernel.lastComm.receive({ type: 'snapshot', runs: [] });
    expect(runs.state.connection).toBe('connected');
  });

  it('opens again when the open reached the kernel before the target did', async () => {
    const { kernel, runs } = setup();
    const starts = withSubshells(kernel);
    const connecting = runs.connect();
    await flush();
    hello(kernel);
    starts[0]();
    await connecting;
    kernel.lastComm.closedByKernel(); // the comm_open was handled before %load_ext registered
    await until(() => kernel.comms.length === 2);
    starts[1]();
    await until(() => kernel.lastComm.opened.length === 1);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
  });

  it('opens again when the kernel handled the open and answered nothing', async () => {
    // What the kernel does with a comm_open addressed to a subshell it does not have: it
    // answers "unknown subshell" to a reply nobody waits for, and the comm stays silent.
    const { kernel, runs } = setup();
    const warn = jest.spyOn(console, 'warn').mockImplementation(() => undefined);
    await runs.connect();
    const lost = kernel.lastComm;
    lost.handled();
    await until(() => kernel.comms.length === 2 && kernel.lastComm.opened.length === 1);
    expect(lost.closedByFrontend).toBe(true);
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
    warn.mockRestore();
    kernel.lastComm.receive({ type: 'snapshot', runs: [] });
    kernel.lastComm.handled();
    await sleep(150);
    expect(kernel.comms).toHaveLength(2); // answered: nothing more
    expect(runs.state.connection).toBe('connected');
  });

  it('gives up reopening after a few silent opens', async () => {
    const { kernel, runs } = setup();
    const warn = jest.spyOn(console, 'warn').mockImplementation(() => undefined);
    await runs.connect();
    for (let i = 0; i < 10 && runs.state.connection === 'connecting'; i++) {
      const comm = kernel.lastComm;
      comm.handled();
      await until(() => kernel.lastComm !== comm || runs.state.connection === 'absent');
      await until(() => kernel.lastComm.opened.length === 1 || runs.state.connection === 'absent');
    }
    expect(runs.state.connection).toBe('absent');
    expect(kernel.comms).toHaveLength(3);
    warn.mockRestore();
  });

  it('lets the dropped comm release its subshell before creating the next', async () => {
    const { kernel, runs } = setup();
    const starts = withSubshells(kernel);
    const first = runs.connect();
    await flush();
    const second = runs.connect(); // e.g. a refresh while the first is still opening
    await flush();
    expect(kernel.comms).toHaveLength(1); // not yet: the first comm's subshell is pending
    starts[0]();
    await first;
    await flush();
    await flush();
    expect(kernel.comms).toHaveLength(2);
    starts[1]();
    await second;
    expect(kernel.lastComm.opened).toEqual([{ type: 'list' }]);
  });

  it('cleans up on dispose and when the kernel goes away', async () => {
    const { kernel, runs } = setup();
    await runs.connect();
    runs.dispose();
    expect(kernel.lastComm.closedByFrontend).toBe(true);
    hello(kernel); // no longer listening
    await flush();
    expect(kernel.comms).toHaveLength(1);
    expect(runs.isDisposed).toBe(true);

    const other = setup();
    other.kernel.disposed.emit();
    expect(other.runs.isDisposed).toBe(true);
  });
});
