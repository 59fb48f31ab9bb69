import { RunSummary } from '../protocol';

/** A RunSummary with sensible defaults; override what the test is about. */
export function makeRun(overrides: Partial<RunSummary> = {}): RunSummary {
  return {
    id: 'run-1',
    prompt: 'For every row in {df}, summarise the review',
    state: 'running',
    done: 0,
    total: 10,
    failed: 0,
    running: 2,
    tokens: 0,
    elapsed_s: 1.5,
    started_at: 1_700_000_000,
    cell_id: 'cell-a',
    out: 'result',
    error: null,
    status: null,
    skipped: 0,
    side_effects: [],
    prompt_full: null,
    earlier: false,
    ...overrides
  };
}
