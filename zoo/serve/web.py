"""The web page of ``zoo serve`` (gradio): pick a model, upload an image or pick an easy-vqa test image, chat about it
with streamed answers under your generation settings, and see in the **Experts** tab where every image patch and
text token was routed, per routed layer (`zoo.experts`).
"""

from __future__ import annotations

import html
import queue

import gradio as gr

from zoo.chat import conversation_ids
from zoo.experts import LayerExperts, beside, expert_colour, expert_map
from zoo.generation import sampling_config
from zoo.serve.engine import spliced_length
from zoo.serve.models import ModelPool, model_choices

EXAMPLES = 12  # easy-vqa test images in the gallery
CSS = "#heatmaps img {image-rendering: pixelated}"  # heatmap cells stay sharp when the gallery scales them


def example_images(count: int = EXAMPLES) -> list[str]:
    """Paths of the first ``count`` easy-vqa test images (shipped in the ``easy-vqa`` package)."""
    from easy_vqa import get_test_image_paths

    paths = get_test_image_paths()
    return [paths[i] for i in sorted(paths)[:count]]


def build_page(pool: ModelPool, default: str) -> gr.Blocks:
    """The page, showing ``default`` (a name `pool` can load) first."""
    choices = model_choices()
    with gr.Blocks(title="zoo serve") as page:
        gr.Markdown("## zoo serve: ask a sparse vision-language model about an image, and watch its experts")
        conversation = gr.State([])  # finished (question, answer) turns about the current image
        layers = gr.State([])  # the Experts view of the last answer: LayerExperts per routed layer
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown([default, *(c for c in choices if c != default)], value=default,
                                    label="Model (local checkpoints, then the catalogue)", allow_custom_value=True,
                                    elem_id="model")
                status = gr.Markdown(describe(pool, default), elem_id="model-status")
                image = gr.Image(type="pil", format="png", label="Image", height=240, elem_id="image")
                gr.Examples(example_images(), inputs=image, label="easy-vqa test images", examples_per_page=EXAMPLES)
                with gr.Accordion("Generation settings", open=False):
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (1: off)")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0: off)")
                    penalty = gr.Slider(0.5, 2, value=1, step=0.05, label="Repetition penalty (1: off)")
                    max_new = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
                    seed = gr.Number(None, precision=0, label="Seed (empty: unseeded)")
                    stop = gr.Textbox(label="Stop strings (comma-separated)")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Chat", elem_id="chat-tab"):
                        chatbot = gr.Chatbot(label="Conversation", height=340, elem_id="chat")
                        question = gr.Textbox(label="Question", placeholder="what color is the shape?",
                                              elem_id="question")
                        with gr.Row():
                            send = gr.Button("Send", variant="primary", elem_id="send")
                            reset = gr.Button("New conversation", elem_id="reset")
                    with gr.Tab("Experts", elem_id="experts-tab"):
                        gr.Markdown("Each cell is an image patch, coloured by the expert it went to (top-1) in that "
                                    "layer; the table gives every patch's top-k experts and gate weights.")
                        legend = gr.HTML(elem_id="legend")
                        maps = gr.Gallery(label="The image's patches and the expert each went to (top-1)",
                                          columns=2, format="png", object_fit="contain", height="auto",
                                          fit_columns=False, elem_id="heatmaps")
                        layer = gr.Dropdown([], label="Layer", elem_id="layer")
                        tokens = gr.HighlightedText(label="Expert of each text token (LM layers)", elem_id="tokens")
                        table = gr.Dataframe(label="Patches: top-k experts and weights", elem_id="patches")
        settings = [temperature, top_p, top_k, penalty, max_new, seed, stop]

        def respond(text, history, picture, name, conv, *options):
            yield from answer(pool, text, history, picture, name, conv, *options)

        ask = dict(fn=respond, inputs=[question, chatbot, image, model, conversation, *settings],
                   outputs=[chatbot, question, conversation, layers, maps, layer, legend], concurrency_limit=None)
        for event in (send.click, question.submit):
            event(**ask).then(show_layer, [layers, layer], [tokens, table])
        layer.change(show_layer, [layers, layer], [tokens, table])
        clear = dict(fn=lambda: ([], [], []), inputs=None, outputs=[chatbot, conversation, layers])
        reset.click(**clear)
        image.change(**clear)
        model.change(lambda name: (describe(pool, name), [], [], []), model, [status, chatbot, conversation, layers])
    return page


def describe(pool: ModelPool, name: str) -> str:
    """The status line of a model: its size and routed parts (loading it if needed), or why it cannot load."""
    try:
        engine = pool.get(name)
    except Exception as e:  # shown on the page; the previous model stays usable
        return f"**cannot load {html.escape(name)}**: {html.escape(str(e))}"
    model = engine.model
    params = sum(p.numel() for p in model.parameters())
    note = " (untrained: built fresh from the catalogue)" if name in pool.untrained else ""
    return f"`{model.config.name}`{note}: {params:,} parameters, {model.num_image_tokens} tokens per image"


def answer(pool: ModelPool, text: str, history: list, picture, name: str, conv: list, temperature: float,
           top_p: float, top_k: float, penalty: float, max_new: float, seed: float | None, stop: str):
    """Stream the answer to ``text`` into the chat, then compute the Experts view of the conversation."""
    if picture is None:
        raise gr.Error("Upload an image or pick an easy-vqa example first.")
    if not text or not text.strip():
        raise gr.Error("Type a question.")
    engine = pool.get(name)
    model = engine.model
    turns = [tuple(t) for t in conv] + [(text.strip(), None)]
    prompt = conversation_ids(model, turns)
    room = model.config.max_length - spliced_length(model, prompt)
    if room < 1:
        raise gr.Error("The conversation is as long as the model's context: start a new one.")
    stops = [s.strip() for s in (stop or "").split(",") if s.strip()]
    config = sampling_config(float(temperature), top_p=float(top_p), top_k=int(top_k), stop=stops,
                             repetition_penalty=float(penalty), max_new_tokens=min(int(max_new), room))
    events: queue.Queue = queue.Queue()
    engine.submit(prompt, picture, config, None if seed is None else int(seed), events.put)
    history = [*history, {"role": "user", "content": text.strip()}, {"role": "assistant", "content": ""}]
    keep = gr.update()
    yield history, "", conv, keep, keep, keep, keep
    while True:
        kind, value = events.get()
        if kind == "error":
            raise gr.Error(value)
        if kind == "done":
            break
        history[-1] = {"role": "assistant", "content": history[-1]["content"] + value}
        yield history, "", conv, keep, keep, keep, keep
    history[-1] = {"role": "assistant", "content": value.text}
    conv = [*turns[:-1], (turns[-1][0], value.text)]
    ids = conversation_ids(model, conv)[:-1]  # the whole conversation as input; the last EOS is never read
    view = engine.call(lambda m: expert_map(m, picture, ids)).result()
    names = [layer.name for layer in view]
    yield (history, "", conv, view, [(beside(picture, layer), caption(layer)) for layer in view],
           gr.update(choices=names, value=names[0] if names else None), legend_html(view))


def caption(layer: LayerExperts) -> str:
    rows, cols = layer.grid.shape
    return f"{layer.name}: {rows}x{cols} patches, {layer.num_experts} experts"


def legend_html(view: list[LayerExperts]) -> str:
    """Colour swatches of the experts (the most any layer has), or a note for a model without routed layers."""
    if not view:
        return "<p>This model has no routed layers: every token goes through the same weights.</p>"
    count = max(layer.num_experts for layer in view)
    swatches = "".join(f'<span style="display:inline-block;margin-right:10px"><span style="display:inline-block;'
                       f'width:14px;height:14px;background:rgb{expert_colour(e, count)};vertical-align:middle"></span>'
                       f" expert {e}</span>" for e in range(count))
    return f"<div>{swatches}</div>"


def show_layer(view: list[LayerExperts], name: str | None):
    """The token highlights and the patch table of the chosen layer."""
    layer = next((entry for entry in view or [] if entry.name == name), None)
    if layer is None:
        return gr.update(value=None), gr.update(value=None)
    rows = layer.patch_rows()
    width = max((len(row) for row in rows), default=2)
    headers = ["row", "col", *(f"choice {i + 1}" for i in range(width - 2))]
    rows = [row + [""] * (width - len(row)) for row in rows]
    colours = {f"expert {e}": "#" + "".join(f"{v:02x}" for v in expert_colour(e, layer.num_experts))
               for e in range(layer.num_experts)}
    tokens = [(token, f"expert {e}" if e >= 0 else None) for token, e in layer.text] if layer.text else None
    return (gr.update(value=tokens, color_map=colours),
            gr.update(value={"headers": headers, "data": rows}))
