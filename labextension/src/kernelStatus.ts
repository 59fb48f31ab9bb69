/**
 * Keep JupyterLab's kernel status honest while a cell runs.
 *
 * With ipykernel >= 7 JupyterLab gives each comm target its own kernel subshell, created
 * with a `create_subshell_request` on the control channel. The kernel reports busy, then
 * idle, for that request, and JupyterLab's status bar showed "Idle" while the cell that
 * displayed a widget (a `%%apwa --wait` cell) was still running. JupyterLab skips statuses
 * whose request type is listed in the page config's `untracked_message_types`, which
 * jupyter_server says must cover every message sent on a channel other than shell; its list
 * predates subshells and misses these. This adds them, for this page only.
 */

import { PageConfig } from '@jupyterlab/coreutils';

/** Control-channel requests of the kernel subshell protocol (JEP 91). */
export const SUBSHELL_CONTROL_MESSAGES = [
  'create_subshell_request',
  'create_subshell_reply',
  'delete_subshell_request',
  'delete_subshell_reply',
  'list_subshell_request',
  'list_subshell_reply'
];

const OPTION = 'untracked_message_types';

function currentList(): string[] {
  try {
    const parsed: unknown = JSON.parse(PageConfig.getOption(OPTION) || '[]');
    return Array.isArray(parsed) ? parsed.filter(t => typeof t === 'string') : [];
  } catch {
    return [];
  }
}

/** Add the subshell control messages to the untracked types; returns the new list. */
export function untrackSubshellControlMessages(): string[] {
  const types = currentList();
  for (const type of SUBSHELL_CONTROL_MESSAGES) {
    if (!types.includes(type)) {
      types.push(type);
    }
  }
  PageConfig.setOption(OPTION, JSON.stringify(types));
  return types;
}
