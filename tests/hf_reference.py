"""Independent references computed with transformers, shared by in-process and torchrun tests."""
import torch


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Token-by-token argmax with transformers, stopping at EOS like vLLM does."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == model.config.eos_token_id:
                break
    return ids[len(prompt):]
