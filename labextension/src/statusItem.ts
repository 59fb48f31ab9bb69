/**
 * Status bar item: `APWA 12 running · 340/1000` while the current kernel has active runs.
 */

import { Widget } from '@lumino/widgets';

import { CurrentNotebookRuns } from './currentRuns';
import { statusText } from './runsState';

export class RunsStatusItem extends Widget {
  constructor(
    private readonly _current: CurrentNotebookRuns,
    onClick: () => void
  ) {
    super();
    this.addClass('apwa-StatusItem');
    this.addClass('jp-StatusBar-TextItem');
    this.node.title = 'APWA runs in this notebook: click to open the runs panel';
    this.node.addEventListener('click', onClick);
    _current.changed.connect(this._update, this);
    this._update();
  }

  /** Whether the item should be shown (the status bar asks through `isActive`). */
  get hasActiveRuns(): boolean {
    return this._text !== null;
  }

  dispose(): void {
    if (!this.isDisposed) {
      this._current.changed.disconnect(this._update, this);
    }
    super.dispose();
  }

  private _update(): void {
    this._text = statusText(this._current.state.runs);
    this.node.textContent = this._text ?? '';
  }

  private _text: string | null = null;
}
