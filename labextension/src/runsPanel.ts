/**
 * The "APWA" sidebar: the current notebook kernel's runs, newest first, updated in place.
 */

import { Widget } from '@lumino/widgets';

import { CurrentNotebookRuns } from './currentRuns';
import { isActiveState } from './protocol';
import {
  formatElapsed,
  formatProgress,
  formatTokens,
  liveElapsed,
  promptLabels,
  RunsState,
  STATE_LABELS,
  TrackedRun
} from './runsState';

export const LOAD_HINT = 'Run %load_ext apwa_jupyter in this notebook';

/** How often elapsed times tick while a run is active. */
const TICK_MS = 1000;

export interface IRunsPanelOptions {
  current: CurrentNotebookRuns;
  /** Select and reveal the cell that started a run; returns false if it is not in the notebook. */
  jumpToCell: (cellId: string) => boolean;
  /** Insert an `%%apwa` template cell in the current notebook. */
  insertCell?: () => void;
  now?: () => number;
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** What a row shows besides the run's own summary. */
interface IRowView {
  /** The part of the prompt to show (see `promptLabels`). */
  label: string;
  cancelling: boolean;
  approving: boolean;
  /** Why the kernel refused the last request about this run. */
  error: string | undefined;
}

/** One run's row; its DOM nodes are kept and updated so buttons survive frequent updates. */
class RunRow {
  readonly node = element('li', 'apwa-Run');

  constructor(runId: string) {
    this.node.dataset.runId = runId;
    const meta = element('div', 'apwa-Run-meta');
    meta.append(this._state, this._effects, this._progress, this._elapsed, this._tokens);
    const bar = element('div', 'apwa-Run-bar');
    bar.append(this._barFill, this._barFailed);
    const actions = element('div', 'apwa-Run-actions');
    this._approve.dataset.action = 'approve';
    this._approve.title = 'Approve this plan and run it (like the Run button of its widget)';
    this._cancel.dataset.action = 'cancel';
    this._cancel.title = 'Cancel this run';
    this._jump.dataset.action = 'jump';
    this._jump.title = 'Go to the cell that started this run';
    actions.append(this._approve, this._jump, this._cancel);
    this.node.append(this._prompt, meta, bar, this._detail, actions);
  }

  update(run: TrackedRun, nowMs: number, view: IRowView): void {
    const active = isActiveState(run.state);
    const partial = run.state === 'done' && run.failed > 0;
    this.node.dataset.state = run.state;
    this.node.classList.toggle('apwa-mod-earlier', run.earlier);
    this._prompt.textContent = view.label || '(empty prompt)';
    this._prompt.title = run.prompt_full ?? run.prompt;
    this._state.textContent =
      run.state === 'failed' ? STATE_LABELS.failed : (run.status ?? STATE_LABELS[run.state]);
    this._effects.hidden = run.side_effects.length === 0;
    this._effects.textContent = 'side effects';
    this._effects.title = `Stages calling tools that write, delete, send or spend: ${run.side_effects.join(', ')}`;
    // "done with 151 failed" is not a success colour.
    this._state.className = `apwa-Run-state apwa-mod-${partial ? 'partial' : run.state}`;
    this._progress.textContent = formatProgress(run);
    this._elapsed.textContent = formatElapsed(liveElapsed(run, nowMs));
    // An earlier kernel's record may not know its tokens: no figure rather than "0 tok".
    this._tokens.hidden = run.tokens === null;
    this._tokens.textContent = run.tokens === null ? '' : `${formatTokens(run.tokens)} tok`;
    const total = Math.max(run.total, 1);
    const done = Math.min(1, run.done / total);
    this._barFill.style.width = `${(done * 100).toFixed(1)}%`;
    this._barFailed.style.width = `${(Math.min(1 - done, run.failed / total) * 100).toFixed(1)}%`;
    const detail =
      view.error ?? run.error ?? (run.out !== null && !active ? `→ ${run.out}` : '');
    this._detail.textContent = detail;
    this._detail.hidden = detail === '';
    this._detail.classList.toggle('apwa-mod-error', view.error !== undefined);
    const awaiting = run.state === 'awaiting_approval' && !run.earlier;
    this._approve.hidden = !awaiting;
    this._approve.disabled = view.approving || view.cancelling;
    this._approve.textContent = view.approving ? 'Starting…' : 'Run';
    this._cancel.hidden = !active;
    this._cancel.disabled = view.cancelling;
    this._cancel.textContent = view.cancelling ? 'Cancelling…' : 'Cancel';
    this._jump.hidden = run.cell_id === null;
    this._jump.dataset.cellId = run.cell_id ?? '';
  }

  private readonly _prompt = element('div', 'apwa-Run-prompt');
  private readonly _state = element('span', 'apwa-Run-state');
  private readonly _effects = element('span', 'apwa-Run-effects');
  private readonly _progress = element('span', 'apwa-Run-progress');
  private readonly _elapsed = element('span', 'apwa-Run-elapsed');
  private readonly _tokens = element('span', 'apwa-Run-tokens');
  private readonly _barFill = element('div', 'apwa-Run-barFill');
  private readonly _barFailed = element('div', 'apwa-Run-barFailed');
  private readonly _detail = element('div', 'apwa-Run-detail');
  private readonly _approve = element('button', 'jp-Button apwa-Run-approve', 'Run');
  private readonly _cancel = element('button', 'jp-Button apwa-Run-cancel', 'Cancel');
  private readonly _jump = element('button', 'jp-Button apwa-Run-jump', 'Go to cell');
}

export class RunsPanel extends Widget {
  constructor(private readonly _options: IRunsPanelOptions) {
    super();
    this.id = 'apwa-runs-panel';
    this.addClass('apwa-RunsPanel');
    this._now = _options.now ?? Date.now;
    const header = element('header', 'apwa-RunsPanel-header');
    header.append(element('span', 'apwa-RunsPanel-title', 'APWA runs'), this._notebookName);
    this._message.hidden = true;
    this._insert.hidden = _options.insertCell === undefined;
    this._insert.addEventListener('click', () => _options.insertCell?.());
    this._empty.append(this._message, this._insert);
    this._list.addEventListener('click', this._onListClick);
    this.node.append(header, this._empty, this._list);
    _options.current.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._stopTicking();
    this._options.current.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(): void {
    this._render();
  }

  private _onListClick = (event: MouseEvent): void => {
    const button = (event.target as HTMLElement).closest('button');
    const row = button?.closest<HTMLElement>('.apwa-Run');
    const runId = row?.dataset.runId;
    if (!button || runId === undefined) {
      return;
    }
    if (button.dataset.action === 'cancel') {
      this._options.current.runs?.cancel(runId);
    } else if (button.dataset.action === 'approve') {
      this._options.current.runs?.approve(runId);
    } else if (button.dataset.action === 'jump') {
      const cellId = button.dataset.cellId ?? '';
      if (cellId && !this._options.jumpToCell(cellId)) {
        button.title = 'That cell is not in this notebook any more';
      }
    }
  };

  private _render(): void {
    const { current } = this._options;
    const state = current.state;
    this._notebookName.textContent = current.notebook?.title.label ?? '';
    this._renderMessage(state, current.notebook !== null);
    this._renderRuns(state);
    if (state.runs.some(run => isActiveState(run.state))) {
      this._startTicking();
    } else {
      this._stopTicking();
    }
  }

  private _renderMessage(state: RunsState, hasNotebook: boolean): void {
    let text = '';
    let offerInsert = false;
    if (!hasNotebook) {
      text = 'Open a notebook to see its APWA runs.';
    } else if (state.connection === 'no-kernel') {
      text = 'This notebook has no running kernel.';
    } else if (state.connection === 'absent') {
      text = LOAD_HINT;
    } else if (state.connection === 'connecting' && state.runs.length === 0) {
      text = 'Waiting for the kernel…';
    } else if (state.connection === 'connected' && state.runs.length === 0) {
      text = 'No runs yet: start one with an %%apwa cell.';
      offerInsert = true;
    }
    this._message.textContent = text;
    this._message.hidden = text === '';
    this._message.classList.toggle('apwa-mod-hint', state.connection === 'absent' && hasNotebook);
    this._insert.hidden = !offerInsert || this._options.insertCell === undefined;
    this._empty.hidden = this._message.hidden && this._insert.hidden;
  }

  private _renderRuns(state: RunsState): void {
    const now = this._now();
    const labels = promptLabels(state.runs);
    const seen = new Set<string>();
    let previous: Element | null = null;
    for (const run of state.runs) {
      seen.add(run.id);
      let row = this._rows.get(run.id);
      if (row === undefined) {
        row = new RunRow(run.id);
        this._rows.set(run.id, row);
      }
      row.update(run, now, {
        label: labels.get(run.id) ?? run.prompt,
        cancelling: state.cancelling.has(run.id),
        approving: state.approving.has(run.id),
        error: state.errors.get(run.id)
      });
      const expected: Element | null = previous ? previous.nextElementSibling : this._list.firstElementChild;
      if (expected !== row.node) {
        this._list.insertBefore(row.node, expected);
      }
      previous = row.node;
    }
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this._rows.delete(id);
      }
    }
  }

  private _startTicking(): void {
    if (this._tick === null) {
      this._tick = window.setInterval(() => {
        if (this.isVisible) {
          this._render();
        }
      }, TICK_MS);
    }
  }

  private _stopTicking(): void {
    if (this._tick !== null) {
      window.clearInterval(this._tick);
      this._tick = null;
    }
  }

  private readonly _now: () => number;
  private readonly _rows = new Map<string, RunRow>();
  private _tick: number | null = null;
  private readonly _notebookName = element('span', 'apwa-RunsPanel-notebook');
  private readonly _empty = element('div', 'apwa-RunsPanel-empty');
  private readonly _message = element('p', 'apwa-RunsPanel-message');
  private readonly _insert = element('button', 'jp-Button jp-mod-styled apwa-RunsPanel-insert', 'Insert APWA cell');
  private readonly _list = element('ul', 'apwa-RunsPanel-list');
}
