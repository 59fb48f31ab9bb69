import { PageConfig } from '@jupyterlab/coreutils';

import { SUBSHELL_CONTROL_MESSAGES, untrackSubshellControlMessages } from '../kernelStatus';

describe('untrackSubshellControlMessages', () => {
  it("keeps the server's list and adds the subshell control messages once", () => {
    PageConfig.setOption('untracked_message_types', JSON.stringify(['stream', 'status']));
    untrackSubshellControlMessages();
    const types = untrackSubshellControlMessages();
    expect(types.slice(0, 2)).toEqual(['stream', 'status']);
    expect(types).toEqual(expect.arrayContaining(SUBSHELL_CONTROL_MESSAGES));
    expect(types).toHaveLength(2 + SUBSHELL_CONTROL_MESSAGES.length);
    expect(JSON.parse(PageConfig.getOption('untracked_message_types'))).toEqual(types);
  });

  it('starts from nothing when the option is missing or unreadable', () => {
    PageConfig.setOption('untracked_message_types', 'not json');
    expect(untrackSubshellControlMessages()).toEqual(SUBSHELL_CONTROL_MESSAGES);
  });
});
