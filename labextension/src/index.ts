/**
 * apwa-jupyter JupyterLab extension: runs panel, status bar item, `%%apwa` cell
 * highlighting and an "Insert APWA cell" command. Every plugin degrades to nothing when the
 * kernel side (`%load_ext apwa_jupyter`) is absent.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton, ToolbarButtonComponent } from '@jupyterlab/apputils';
import {
  EditorExtensionRegistry,
  IEditorExtensionRegistry
} from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { listIcon } from '@jupyterlab/ui-components';

import { CurrentNotebookRuns } from './currentRuns';
import { apwaCellHighlighter } from './highlight/apwaCellExtension';
import { apwaIcon } from './icons';
import { untrackSubshellControlMessages } from './kernelStatus';
import { insertApwaCell, revealCell } from './notebookActions';
import { RunsPanel } from './runsPanel';
import { RunsStatusItem } from './statusItem';

export const PLUGIN_PREFIX = 'apwa-jupyter';

export namespace CommandIDs {
  export const insertCell = `${PLUGIN_PREFIX}:insert-cell`;
  export const openRunsPanel = `${PLUGIN_PREFIX}:open-runs-panel`;
}

const PALETTE_CATEGORY = 'APWA';

/** Lab's shell, or Notebook 7's, both have a left area; other shells may not. */
function hasLeftArea(app: JupyterFrontEnd, labShell: ILabShell | null): boolean {
  return labShell !== null || 'leftHandler' in app.shell;
}

/**
 * A button in every notebook's toolbar, after the cell type selector (or near the start when a
 * toolbar has none, as Notebook 7's may not).
 */
function addNotebookToolbarButton(
  app: JupyterFrontEnd,
  name: string,
  options: (panel: NotebookPanel) => ToolbarButtonComponent.IProps
): void {
  app.docRegistry.addWidgetExtension('Notebook', {
    createNew: (panel: NotebookPanel) => {
      const button = new ToolbarButton(options(panel));
      if (!panel.toolbar.insertAfter('cellType', name, button)) {
        panel.toolbar.insertItem(10, name, button);
      }
      return button;
    }
  });
}

const runsPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:runs`,
  description: 'APWA runs panel and status bar item for the current notebook kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell, ILayoutRestorer, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ): void => {
    const current = new CurrentNotebookRuns(tracker);
    if (!hasLeftArea(app, labShell)) {
      return;
    }
    const panel = new RunsPanel({
      current,
      jumpToCell: cellId => {
        const notebook = current.notebook;
        if (notebook === null || !revealCell(notebook, cellId)) {
          return false;
        }
        app.shell.activateById(notebook.id);
        return true;
      },
      insertCell: () => {
        if (app.commands.hasCommand(CommandIDs.insertCell)) {
          void app.commands.execute(CommandIDs.insertCell);
        }
      }
    });
    panel.title.icon = apwaIcon;
    panel.title.caption = 'APWA runs';
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(CommandIDs.openRunsPanel, {
      label: 'Show APWA Runs',
      caption: 'Show the runs of the current notebook kernel',
      icon: apwaIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: CommandIDs.openRunsPanel, category: PALETTE_CATEGORY });

    // Notebook 7 hides its left sidebar and has no status bar: without this button the panel
    // was only reachable through View > Left Sidebar > Show APWA runs.
    addNotebookToolbarButton(app, 'apwa-show-runs', () => ({
      icon: listIcon,
      label: 'Runs',
      tooltip: 'Show the APWA runs of this kernel',
      className: 'apwa-ShowRunsButton',
      onClick: () => void app.commands.execute(CommandIDs.openRunsPanel)
    }));

    if (statusBar !== null) {
      const item = new RunsStatusItem(current, () => {
        void app.commands.execute(CommandIDs.openRunsPanel);
      });
      statusBar.registerStatusItem(`${PLUGIN_PREFIX}:status`, {
        item,
        align: 'left',
        rank: 50,
        isActive: () => item.hasActiveRuns,
        activeStateChanged: current.changed
      });
    }
  }
};

const kernelStatusPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:kernel-status`,
  description: "Keeps the kernel status Busy while a cell runs (kernel subshells' own statuses).",
  autoStart: true,
  activate: (): void => {
    untrackSubshellControlMessages();
  }
};

const highlightPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:highlight`,
  description: 'Highlights the body of %%apwa cells as a prompt with {name} references.',
  autoStart: true,
  requires: [IEditorExtensionRegistry],
  activate: (_app: JupyterFrontEnd, registry: IEditorExtensionRegistry): void => {
    registry.addExtension({
      name: `${PLUGIN_PREFIX}:apwa-cell`,
      // Only inline editors (notebook and console cells) hold %%apwa cells.
      factory: options =>
        options.inline ? EditorExtensionRegistry.createImmutableExtension(apwaCellHighlighter) : null
    });
  }
};

const insertCellPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:insert-cell`,
  description: 'Command and notebook toolbar button inserting an %%apwa template cell.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null
  ): void => {
    app.commands.addCommand(CommandIDs.insertCell, {
      label: 'Insert APWA cell',
      caption: 'Insert a %%apwa cell below the active cell',
      icon: apwaIcon,
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => {
        const panel = tracker.currentWidget;
        if (panel !== null) {
          insertApwaCell(panel);
        }
      }
    });
    palette?.addItem({ command: CommandIDs.insertCell, category: PALETTE_CATEGORY });

    addNotebookToolbarButton(app, 'apwa-insert-cell', panel => ({
      icon: apwaIcon,
      tooltip: 'Insert APWA cell',
      className: 'apwa-InsertCellButton',
      onClick: () => insertApwaCell(panel)
    }));
  }
};

const plugins: JupyterFrontEndPlugin<void>[] = [
  runsPlugin,
  kernelStatusPlugin,
  highlightPlugin,
  insertCellPlugin
];

export default plugins;
