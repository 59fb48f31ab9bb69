/**
 * CodeMirror 6 extension: in an `%%apwa` cell, mark the body lines as prose and the
 * `{name}` references as references. The Python highlighter keeps running; the stylesheet
 * neutralises its colours inside prompt lines.
 */

import { Range, Text } from '@codemirror/state';
import {
  Decoration,
  DecorationSet,
  EditorView,
  ViewPlugin,
  ViewUpdate
} from '@codemirror/view';

import { analyzeApwaCell, HIGHLIGHT_CLASSES, isApwaCell } from './apwaCellRules';

const magicLine = Decoration.line({ class: HIGHLIGHT_CLASSES.magicLine });
const promptLine = Decoration.line({ class: HIGHLIGHT_CLASSES.promptLine });
const reference = Decoration.mark({ class: HIGHLIGHT_CLASSES.reference });

export function apwaCellDecorations(source: string): DecorationSet {
  const layout = analyzeApwaCell(source);
  if (layout === null) {
    return Decoration.none;
  }
  const ranges: Range<Decoration>[] = [
    magicLine.range(layout.magicLine.from),
    ...layout.bodyLines.map(line => promptLine.range(line.from)),
    ...layout.references.map(ref => reference.range(ref.from, ref.to))
  ];
  return Decoration.set(ranges, true);
}

function decorationsFor(doc: Text): DecorationSet {
  // Look at the first line before serialising the whole document.
  return isApwaCell(doc.line(1).text) ? apwaCellDecorations(doc.toString()) : Decoration.none;
}

/** The view plugin; recomputes on every document change (cells are small). */
export const apwaCellHighlighter = ViewPlugin.fromClass(
  class {
    decorations: DecorationSet;

    constructor(view: EditorView) {
      this.decorations = decorationsFor(view.state.doc);
    }

    update(update: ViewUpdate): void {
      if (update.docChanged) {
        this.decorations = decorationsFor(update.state.doc);
      }
    }
  },
  { decorations: plugin => plugin.decorations }
);
