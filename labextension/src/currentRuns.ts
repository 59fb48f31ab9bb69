/**
 * Follows the current notebook and its kernel, and hands out the KernelRuns of that kernel.
 * One KernelRuns per kernel connection, kept while the kernel lives so switching back and
 * forth between notebooks is instant.
 */

import type { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import type { Kernel } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { KernelRuns } from './kernelRuns';
import { INITIAL_STATE, RunsState } from './runsState';

export class CurrentNotebookRuns {
  constructor(private readonly _tracker: INotebookTracker) {
    _tracker.currentChanged.connect(this._onCurrentNotebook, this);
    this._onCurrentNotebook();
  }

  /** The notebook the panel describes (the last focused one), if any. */
  get notebook(): NotebookPanel | null {
    return this._notebook;
  }

  get runs(): KernelRuns | null {
    return this._runs;
  }

  get state(): RunsState {
    return this._runs?.state ?? INITIAL_STATE;
  }

  /** Emits when the notebook, its kernel, or that kernel's runs change. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  dispose(): void {
    this._tracker.currentChanged.disconnect(this._onCurrentNotebook, this);
    this._watchNotebook(null);
    for (const runs of this._byKernel.values()) {
      runs.dispose();
    }
    this._byKernel.clear();
    Signal.clearData(this);
  }

  private _onCurrentNotebook(): void {
    const panel = this._tracker.currentWidget;
    if (panel === this._notebook) {
      return;
    }
    this._watchNotebook(panel);
  }

  private _watchNotebook(panel: NotebookPanel | null): void {
    const previous = this._notebook;
    if (previous !== null && !previous.isDisposed) {
      previous.sessionContext.kernelChanged.disconnect(this._onKernelChanged, this);
      previous.disposed.disconnect(this._onNotebookDisposed, this);
    }
    this._notebook = panel;
    if (panel !== null) {
      panel.sessionContext.kernelChanged.connect(this._onKernelChanged, this);
      panel.disposed.connect(this._onNotebookDisposed, this);
    }
    this._useKernel(panel?.sessionContext.session?.kernel ?? null);
  }

  private _onNotebookDisposed(): void {
    this._watchNotebook(this._tracker.currentWidget);
  }

  private _onKernelChanged(): void {
    this._useKernel(this._notebook?.sessionContext.session?.kernel ?? null);
  }

  private _useKernel(kernel: Kernel.IKernelConnection | null): void {
    const next = kernel === null || kernel.isDisposed ? null : this._runsFor(kernel);
    if (next !== this._runs) {
      this._runs?.stateChanged.disconnect(this._emit, this);
      this._runs = next;
      this._runs?.stateChanged.connect(this._emit, this);
    }
    this._emit();
  }

  private _runsFor(kernel: Kernel.IKernelConnection): KernelRuns {
    let runs = this._byKernel.get(kernel);
    if (runs === undefined) {
      const created = new KernelRuns(kernel);
      this._byKernel.set(kernel, created);
      kernel.disposed.connect(() => {
        this._byKernel.delete(kernel);
        if (this._runs === created) {
          this._useKernel(null);
        }
      });
      void created.connect();
      runs = created;
    }
    return runs;
  }

  private _emit(): void {
    this._changed.emit();
  }

  private _notebook: NotebookPanel | null = null;
  private _runs: KernelRuns | null = null;
  private readonly _byKernel = new Map<Kernel.IKernelConnection, KernelRuns>();
  private readonly _changed = new Signal<this, void>(this);
}
