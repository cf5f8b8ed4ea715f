// Small helpers over a LiteGraph node's widgets (no DOM): read the values, grey out or hide widgets, grow the
// node to fit. Shared by the flux2kit extensions; tested with `node --test web/tests` on plain objects.

/** {name: value} of a node's widgets; undefined for a widget whose input is linked (its value comes at run time). */
export function widgetValues(node) {
  const values = {};
  for (const w of node.widgets ?? []) {
    const slot = node.inputs?.find((i) => i.widget?.name === w.name);
    values[w.name] = slot?.link != null ? undefined : w.value;
  }
  return values;
}

/**
 * Disable (grey out, as the frontend shows an input a link overrides) the widgets named in `reasons`
 * ({name: why}, kept on the widget as flux2kitDisabled) and re-enable the ones flux2kit disabled before.
 * Values are untouched: they stay in the saved workflow and the prompt. True when something changed.
 */
export function applyDisabled(node, reasons) {
  let changed = false;
  for (const w of node.widgets ?? []) {
    const why = reasons[w.name];
    if (why) {
      if (!w.disabled) changed = true;
      w.disabled = true;
      w.flux2kitDisabled = why;
    } else if (w.flux2kitDisabled) {
      w.disabled = false;
      delete w.flux2kitDisabled;
      changed = true;
    }
  }
  return changed;
}

/** Hide exactly the widgets in `names` among those flux2kit manages (values stay saved). True when something changed. */
export function applyHidden(node, names) {
  let changed = false;
  for (const w of node.widgets ?? []) {
    const hide = names.includes(w.name);
    if (hide !== Boolean(w.flux2kitHidden)) {
      w.hidden = hide;
      w.flux2kitHidden = hide;
      changed = true;
    }
  }
  return changed;
}

/** Grow (never shrink) the node to its computed minimum height. */
export function growToFit(node) {
  const need = node.computeSize?.();
  if (need && node.size[1] < need[1]) node.setSize([node.size[0], need[1]]);
  node.setDirtyCanvas?.(true, true);
}

/** Chain `after` behind a prototype method (ComfyUI's extensions each wrap the node type's callbacks). */
export function chainMethod(prototype, name, after) {
  const before = prototype[name];
  prototype[name] = function () {
    const result = before?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

/** Call `onChange(node)` after any widget's own callback (a value edited on the node). */
export function watchWidgets(node, onChange) {
  for (const w of node.widgets ?? []) {
    if (w.flux2kitWatched) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const result = callback?.apply(this, args);
      onChange(node);
      return result;
    };
    w.flux2kitWatched = true;
  }
}
