/**
 * Notebook edits the extension performs: insert an `%%apwa` template cell, reveal a cell.
 */

import { NotebookActions, NotebookPanel } from '@jupyterlab/notebook';

export const APWA_CELL_TEMPLATE = '%%apwa --out result\nFor every row in {df}, ...';

/** Where the template's placeholder (`...`) starts, to select it after inserting. */
const PLACEHOLDER = '...';

/** Insert a code cell with the `%%apwa` template below the active cell and edit it. */
export function insertApwaCell(panel: NotebookPanel): void {
  const notebook = panel.content;
  NotebookActions.insertBelow(notebook);
  if (notebook.activeCell?.model.type !== 'code') {
    NotebookActions.changeCellType(notebook, 'code');
  }
  const cell = notebook.activeCell;
  if (cell === null) {
    return;
  }
  cell.model.sharedModel.setSource(APWA_CELL_TEMPLATE);
  notebook.mode = 'edit';
  const lines = APWA_CELL_TEMPLATE.split('\n');
  const line = lines.length - 1;
  const column = lines[line].lastIndexOf(PLACEHOLDER);
  const editor = cell.editor;
  if (editor !== null && column >= 0) {
    editor.setSelection({
      start: { line, column },
      end: { line, column: column + PLACEHOLDER.length }
    });
    editor.focus();
  }
}

/** Select and scroll to the cell with this id; false when the notebook has no such cell. */
export function revealCell(panel: NotebookPanel, cellId: string): boolean {
  const notebook = panel.content;
  const index = notebook.widgets.findIndex(cell => cell.model.id === cellId);
  if (index < 0) {
    return false;
  }
  notebook.mode = 'command';
  notebook.activeCellIndex = index;
  void notebook.scrollToCell(notebook.widgets[index], 'center');
  return true;
}
