"""The page of a web session (trame + Vuetify 3): the panel beside the Slicer views rendered on the
server. ``build_page(app)`` takes the :class:`~ctlanguage_web.app.CTLanguageWebApp` whose state
and controller the widgets bind to.
"""

from __future__ import annotations

ACCEPT = ".nii,.nii.gz,.gz,.nrrd,.mha,.zip,.dcm"


def build_page(app):
    """The page: the panel (model, load, encode, ask, results, download) beside the Slicer views."""
    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    with VAppLayout(app.server, theme="dark") as layout:
        with v.VAppBar(density="compact", elevation=1):
            v.VToolbarTitle("CTLanguage", classes="text-h6", style="flex: 0 0 auto;")
            html.Span("free-text prompts → 3D masks + finding scores",
                      classes="text-caption text-medium-emphasis ml-4")
            v.VSpacer()
            html.Span("{{ model_label }}", classes="text-caption text-warning mr-4", id="model-label")
        with v.VNavigationDrawer(permanent=True, width=470, id="ctl-panel"):
            with html.Div(classes="pa-3", style="font-size: 14px;"):
                _model_section(app, html, v)
                v.VDivider(classes="my-3")
                _load_section(app, html, v)
                v.VDivider(classes="my-3")
                _encode_section(app, html, v)
                v.VDivider(classes="my-3")
                _prompt_section(app, html, v)
                _results_section(app, html, v)
                v.VDivider(classes="my-3")
                _download_section(app, html, v)
        with v.VMain():
            with html.Div(style="position: relative; width: 100%; height: calc(100vh - 48px);",
                          id="ctl-views"):
                app.layout_manager.initialize_layout_grid(layout)
                html.Div("Load a synthetic case or upload a CT to start.", v_if=("!has_volume",),
                         id="views-hint",
                         style="position: absolute; top: 50%; left: 50%; transform: translate(-50%, -50%);"
                               " color: #bbb; background: rgba(0,0,0,0.6); padding: 12px 20px;"
                               " border-radius: 6px; pointer-events: none; font-size: 16px;")
    return layout


def _model_section(app, html, v):
    html.Div("Model", classes="text-subtitle-1 font-weight-bold mb-2")
    v.VSelect(model_value=("model_spec",), items=("models",), item_props=True, density="compact",
              hide_details=True, id="model-select", disabled=("encoding",),
              update_modelValue="trigger('ctl_model', [$event])")
    html.Div("{{ model_details }}", classes="text-caption mt-1", id="model-details",
             style="white-space: pre-line;")
    v.VAlert(v_if=("model_notice",), text=("model_notice",), type="warning", density="compact",
             variant="tonal", classes="mt-2 text-caption", id="model-notice")
    v.VAlert(v_if=("model_error",), text=("model_error",), type="error", density="compact",
             variant="tonal", classes="mt-2", id="model-error")


def _load_section(app, html, v):
    html.Div("1. Load a CT", classes="text-subtitle-1 font-weight-bold mb-2")
    with html.Div(classes="d-flex align-center"):
        v.VSelect(v_model=("case_id",), items=("cases",), density="compact", hide_details=True,
                  label="Synthetic case", id="case-select", classes="mr-2")
        v.VBtn("Load case", click=app.ctrl.ctl_load_case, color="primary", id="load-case",
               disabled=("encoding",))
    change = (
        "const fs = $event.target.files; if (!fs || !fs.length) return;"
        "let total = 0; for (const f of fs) total += f.size;"
        "if (total > max_upload_bytes) {"
        "  trame.trigger('ctl_upload_refused', [fs[0].name, total]); $event.target.value = ''; return; }"
        "loading = true; load_message = 'Uploading ' + fs[0].name + ' …'; load_message_type = 'info';"
        "window.load_files_by_chunks(fs, { trigger_name: 'ctl_upload_chunk' })"
        "  .then(({ status, errorMsg }) =>"
        "     trame.trigger('ctl_upload_end', [status ? 'success' : 'failure', errorMsg]))"
        "  .catch((e) => trame.trigger('ctl_upload_end', ['failure', String(e)]))"
        "  .finally(() => { loading = false; $event.target.value = ''; });"
    )
    v.VFileInput(label="…or upload NIfTI / NRRD / MHA, or a zipped DICOM folder", accept=ACCEPT,
                 density="compact", classes="mt-3", id="upload-input", change=change,
                 disabled=("loading || encoding",), hide_details=True, show_size=True,
                 prepend_icon="mdi-upload")
    html.Div("Max {{ Math.round(max_upload_bytes / 1e6) }} MB. Files stay on this server only "
             "for this session.", classes="text-caption text-medium-emphasis")
    v.VProgressLinear(indeterminate=True, v_if=("loading",), classes="mt-1")
    v.VAlert(v_if=("load_message",), text=("load_message",), type=("load_message_type",),
             density="compact", variant="tonal", classes="mt-2", id="load-message")
    html.Div("{{ volume_info }}", v_if=("volume_info",), classes="text-caption mt-1", id="volume-info")
    html.Div("{{ truth_info }}", v_if=("truth_info",), classes="text-caption text-medium-emphasis",
             id="truth-info")


def _encode_section(app, html, v):
    html.Div("2. Encode (once per CT)", classes="text-subtitle-1 font-weight-bold mb-2")
    with html.Div(classes="d-flex align-center"):
        v.VBtn("Encode", click=app.ctrl.ctl_encode, color="primary", id="encode-btn",
               disabled=("!has_volume || encoding",), classes="mr-2")
        v.VBtn("Cancel", click=app.ctrl.ctl_cancel, v_if=("encoding",), variant="outlined",
               id="cancel-btn", classes="mr-2")
        v.VProgressLinear(model_value=("encode_progress",), height=18, rounded=True,
                          color=("encoded ? 'success' : 'primary'",), id="encode-progress",
                          striped=("encoding",))
    html.Div("{{ encode_message }}", classes="text-caption mt-1", id="encode-message")
    v.VAlert(v_if=("encode_error",), text=("encode_error",), type="error", density="compact",
             variant="tonal", classes="mt-2", id="encode-error")


def _prompt_section(app, html, v):
    html.Div("3. Ask", classes="text-subtitle-1 font-weight-bold mb-2")
    with html.Div(classes="d-flex align-center"):
        v.VTextField(v_model=("prompt_text",), label="Prompt, e.g. 'liver lesion; fluid around the left lung'",
                     density="compact", hide_details=True, id="prompt-input", classes="mr-2",
                     disabled=("!encoded",), keyup_enter=app.ctrl.ctl_run, clearable=True)
        v.VBtn("Run", click=app.ctrl.ctl_run, color="primary", id="run-btn",
               disabled=("!encoded || !prompt_text",))
    v.VAlert(v_if=("prompt_error",), text=("prompt_error",), type="warning", density="compact",
             variant="tonal", classes="mt-2", id="prompt-error")


def _results_section(app, html, v):
    with html.Div(v_if=("results.length",), classes="mt-3"):
        html.Div("Results (click a row to jump to it)", classes="text-caption text-medium-emphasis mb-1")
        with v.VTable(density="compact", id="results-table", hover=True):
            with html.Thead():
                with html.Tr():
                    for title in ("", "prompt", "anatomy", "score", "prompt confidence", "ml", ""):
                        html.Th(title, style="padding: 0 4px;")
            with html.Tbody():
                with html.Tr(v_for="r in results", key="r.row", classes="result-row",
                             click="trigger('ctl_jump', [r.row])",
                             style=("{cursor: 'pointer', background: r.row === selected_row ? "
                                    "'rgba(120,160,255,0.18)' : ''}",),
                             __properties=[("data_row", "data-row")], data_row=("r.row",)):
                    with html.Td(style="padding: 0 4px;"):
                        html.Span(style=("{display: 'inline-block', width: '14px', height: '14px', "
                                         "borderRadius: '3px', background: r.color}",),
                                  classes="swatch")
                    html.Td("{{ r.prompt }}", classes="col-prompt", style="padding: 0 4px;")
                    html.Td("{{ r.anatomy }}", classes="col-anatomy text-caption", style="padding: 0 4px;")
                    html.Td("{{ r.probability_text }}", classes="col-probability",
                            title=("r.score_label + (r.models ? ' — ' + r.models : '')",),
                            style=("{padding: '0 4px', fontWeight: r.present ? 'bold' : 'normal', "
                                   "color: r.present ? '#ffb74d' : ''}",))
                    html.Td("{{ r.confidence_text }}", classes="col-confidence", style="padding: 0 4px;")
                    html.Td("{{ r.volume_text }}", classes="col-volume", style="padding: 0 4px;")
                    with html.Td(style="padding: 0 2px;"):
                        v.VBtn(icon="mdi-close", size="x-small", variant="text",
                               click="trigger('ctl_remove', [r.row]); $event.stopPropagation()")
        html.Div("Score: the probability that the finding is present where the model is calibrated, "
                 "else marked uncalibrated (bold when ≥ 0.5; hover for who made it). Research use only.",
                 classes="text-caption text-medium-emphasis")


def _download_section(app, html, v):
    html.Div("4. Download", classes="text-subtitle-1 font-weight-bold mb-2")
    html.Div("Run a prompt to enable the exports.", v_if=("!results.length",),
             classes="text-caption text-medium-emphasis")
    with html.Div(v_if=("results.length",), classes="d-flex flex-wrap", id="downloads"):
        v.VBtn("{{ k.label }}", v_for="k in export_kinds", key="k.kind", size="small",
               variant="tonal", classes="ma-1 download-btn",
               href=("`${download_base}/${k.kind}`",), raw_attrs=["download"],
               __properties=[("data_kind", "data-kind")], data_kind=("k.kind",))
    v.VAlert(v_if=("export_warning",), text=("export_warning",), type="warning", density="compact",
             variant="tonal", classes="mt-2", id="export-warning")


def no_gutter(server, view_id, slicer_view):
    """No per-view toolbars (the panel drives the views): only a small name label, whose id
    (``ctl-view-axial`` ...) also lets tests find a view's image."""
    from trame.widgets import html

    get = getattr(slicer_view, "get_orientation", None)
    name = str(get() if callable(get) else "3D") or "3D"
    html.Div(name, id=f"ctl-view-{name.lower()}", classes="ctl-view-label",
             style="position: absolute; top: 4px; left: 8px; color: #e0e0e0; font-size: 12px; "
                   "pointer-events: none; text-shadow: 0 0 3px #000;")
