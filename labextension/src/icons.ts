import { LabIcon } from '@jupyterlab/ui-components';

import apwaSvg from '../style/apwa-icon.svg';

/** A manager node fanning out to parallel workers. */
export const apwaIcon = new LabIcon({ name: 'apwa-jupyter:runs', svgstr: apwaSvg });
