"""The Gradio page of `vqatune serve`: the Ask tab (``serve.AskSession``) and the Explore tab
(``serve_explore.Evaluation``). Every failure is a message on the page, never a traceback."""
from __future__ import annotations

import logging

from ..data.kvasir import QUESTIONS
from ..prompts import PROMPT_MODES
from .ask import AskError
from .serve_explore import ALL, RESULTS, SHOWN, TABLE_METRICS, caption, summary

log = logging.getLogger(__name__)


def _theme():
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, and the page must work offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_app(session, evaluation):
    """(gr.Blocks, theme) for ``session`` (AskSession) and ``evaluation`` (Evaluation)."""
    import gradio as gr

    def ask(image_path, question, mode):
        try:
            base, tuned = session.answer(image_path, question, mode)
        except AskError as err:
            return "", "", f"⚠️ {err}"
        except Exception as err:  # noqa: BLE001  a message, never a traceback on the page
            log.exception("answering failed")
            return "", "", f"⚠️ Could not answer ({type(err).__name__}: {err})."
        return base, tuned, "Answered."

    def preview(image_path):
        if not image_path:
            return None
        try:
            from PIL import Image

            with Image.open(image_path) as img:
                img.load()
                return img.convert("RGB")
        except Exception:  # noqa: BLE001  shown as a message when asking
            return None

    def explore(configuration, category, result):
        if evaluation.error:
            return [], [], evaluation.error, []
        rows = evaluation.rows(configuration, category, result)
        items = [(evaluation.image(r["img_id"]), caption(r)) for r in rows[:SHOWN]]
        table = [[r["category"], r["question"], r["reference"], r["prediction"],
                  "right" if r["exact_match"] else "wrong"] for r in rows[:SHOWN]]
        return (items, table, summary(rows, configuration, category, result),
                evaluation.category_table(configuration))

    with gr.Blocks(title="vqatune") as app:
        gr.Markdown("# vqatune: MedGemma on Kvasir-VQA\nAsk the base and the tuned model about an "
                    "endoscopy image, or explore how they did on the test split.")
        with gr.Tab("Ask", id="ask"):
            if session.error:
                gr.Markdown(f"⚠️ {session.error}", elem_id="model-status")
            with gr.Row():
                with gr.Column():
                    image = gr.File(label="Image (upload or drop a png, jpg, ...)", type="filepath",
                                    elem_id="ask-image")
                    shown = gr.Image(label="Preview", interactive=False, height=220)
                with gr.Column():
                    picked = gr.Dropdown(list(QUESTIONS), label="A Kvasir-VQA question (fills the box)",
                                         value=None, elem_id="ask-pick")
                    question = gr.Textbox(label="Question", lines=2, elem_id="ask-question")
                    mode = gr.Radio(list(PROMPT_MODES), value="static", label="Prompt mode",
                                    elem_id="ask-mode")
                    button = gr.Button("Ask both models", variant="primary", elem_id="ask-button")
            message = gr.Markdown(elem_id="ask-message")
            with gr.Row():
                base = gr.Textbox(label="Base model", interactive=False, elem_id="base-answer")
                tuned = gr.Textbox(label="Tuned model (base + adapter)", interactive=False,
                                   elem_id="tuned-answer")
            image.change(preview, image, shown)
            picked.change(lambda q: q or "", picked, question)
            button.click(ask, [image, question, mode], [base, tuned, message])
            question.submit(ask, [image, question, mode], [base, tuned, message])
        with gr.Tab("Explore the evaluation", id="explore"):
            if evaluation.error:
                gr.Markdown(f"⚠️ {evaluation.error}", elem_id="explore-status")
            configurations = evaluation.configurations or ["-"]
            default = "tuned_static" if "tuned_static" in configurations else configurations[0]
            with gr.Row():
                configuration = gr.Radio(configurations, value=default, label="Configuration",
                                         elem_id="explore-configuration")
                category = gr.Radio([ALL, *evaluation.categories], value=ALL, label="Category",
                                    elem_id="explore-category")
                result = gr.Radio(list(RESULTS), value=ALL, label="Answer", elem_id="explore-result")
            counts = gr.Markdown(elem_id="explore-summary")
            gallery = gr.Gallery(label="Test images (reference and prediction in each caption)",
                                 columns=6, height=420, elem_id="explore-gallery")
            rows = gr.Dataframe(headers=["category", "question", "reference", "prediction", "answer"],
                                label="Rows shown", interactive=False, wrap=True, elem_id="explore-rows")
            gr.Markdown("### Scores by category (selected configuration)")
            table = gr.Dataframe(headers=["category", *TABLE_METRICS], interactive=False,
                                 elem_id="explore-categories")
            gr.Markdown("### Prompt modes and categories")
            for plot in getattr(evaluation, "plots", []):
                gr.Image(str(plot), label=plot.name, interactive=False, show_label=True)
            filters = [configuration, category, result]
            for control in filters:
                control.change(explore, filters, [gallery, rows, counts, table])
            app.load(explore, filters, [gallery, rows, counts, table])
    return app, _theme()
