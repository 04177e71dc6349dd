"""What the report labeler reads: mention phrases per observation and the cues that negate them or make them uncertain.

Written for this project after the design of the CheXpert labeler (Irvin et al., 2019): per observation,
phrases whose match is a mention, "unmention" phrases that look like a mention but are something else
(a pericardial effusion is not a pleural effusion), and three cue lists applied in the scope of a clause:
pre-negation uncertainty ("cannot exclude"), negation ("no", "without", "resolved"), post-negation
uncertainty ("may", "likely"). Added here: "normal statements" ("heart size is normal"), which are
mentions that are negative by themselves. All patterns are regex fragments matched on lower-cased text.
"""

# Words that may not sit between a subject and its state ("heart ... enlarged"): a clause turn, or the
# opposite state, so that "heart size is enlarged, lungs are normal" is not read as a normal heart.
_GAP_STOP = r"(?:but|however|although|though|while|whereas|which|normal|unremarkable|enlarg\w*|widen\w*|increas\w*)\b"
_NORMAL_STATES = (
    r"normal(?! position)",
    r"unremarkable",
    r"within normal limits",
    r"(?:at )?(?:the )?upper limits? of normal",
)


def subject_state(subjects, states, max_gap=4):
    """'<subject> ... <state>' with at most `max_gap` words between ("heart size is mildly enlarged"),
    or '<state> <subject>' ("enlarged heart")."""
    subject, state = "|".join(subjects), "|".join(states)
    gap = rf"(?:[\s,]+(?!{_GAP_STOP})[\w/'-]+){{0,{max_gap}}}?[\s,]+"
    return rf"\b(?:{subject})\b{gap}(?:{state})\b|\b(?:{state})\s+(?:{subject})\b"


_HEART = (r"heart(?: size)?", r"cardiac (?:silhouette|size|contours?|shadow)", r"size of the heart")
_MEDIASTINUM = (
    r"cardiomediastinal(?: silhouette| contours?| structures| size| width)?",
    r"cardiomediastinum",
    r"mediastinum",
    r"mediastinal (?:silhouette|contours?|width|structures)",
)

MENTIONS = {
    "Enlarged Cardiomediastinum": (
        subject_state(_MEDIASTINUM, (r"enlarged", r"enlargement", r"widened", r"widening", r"wide", r"prominent")),
        r"\b(?:cardio)?mediastinal (?:widening|enlargement)\b",
    ),
    "Cardiomegaly": (
        r"\bcardiomegaly\b",
        r"\bcardiac enlargement\b",
        r"\benlargement of the (?:heart|cardiac silhouette)\b",
        subject_state(_HEART, (r"enlarged", r"increased", r"large", r"prominent")),
    ),
    "Lung Lesion": (
        r"\bnodul(?:e|es|ar|arity)\b",
        r"\bmass(?:es)?\b",
        r"\b(?:lung|pulmonary|cavitary|cavitating|parenchymal|spiculated) lesions?\b",
        r"\btumou?rs?\b",
        r"\bneoplasm\w*",
        r"\bmalignan\w*",
        r"\bcarcinoma\b",
        r"\bcancer\b",
        r"\bmetasta\w+",
    ),
    "Lung Opacity": (
        r"\bopaci\w+",
        r"\bair[- ]?space (?:disease|process|filling)\b",
        r"\binfiltra\w+",
        r"\bdensit(?:y|ies)\b",
        r"\bhaziness\b",
        r"\bground[- ]glass\b",
        r"\breticula\w*",
        r"\binterstitial (?:markings?|opacit\w+|prominence|pattern|disease|abnormalit\w+|thickening)\b",
        r"\bscar(?:s|ring)?\b",
        r"\bfibro(?:sis|tic)\b",
    ),
    "Edema": (
        r"\boedema\b|\bedema\b",
        r"\b(?:pulmonary|vascular|venous|interstitial) congestion\b",
        r"\bcongestive heart failure\b",
        r"\bchf\b",
        r"\bfluid overload\b",
        r"\bvascular (?:engorgement|redistribution)\b",
        r"\bcephalization\b",
    ),
    "Consolidation": (r"\bconsolidat\w*",),
    "Pneumonia": (
        r"\b(?:broncho)?pneumoni(?:a|as|ae|tis)\b",
        r"\binfect(?:ion|ions|ious)\b",
        r"\baspiration\b",
    ),
    "Atelectasis": (
        r"\batelecta\w+",
        r"\b(?:lobar|lobe|lung|segmental|subsegmental) collapse\b",
        r"\bcollapse of the\b",
    ),
    "Pneumothorax": (r"\b(?:hydro)?pneumothora(?:x|ces)\b", r"\bptx\b"),
    "Pleural Effusion": (
        r"\beffusions?\b",
        r"\bpleural fluid\b",
        r"\b(?:hydrothorax|hydropneumothorax)\b",
        r"\bblunt(?:ing|ed) (?:of )?(?:the )?(?:left |right |bilateral )?(?:costophrenic|cp) "
        r"(?:angles?|sulci|sulcus)\b",
        r"\bcostophrenic (?:angle |sulcus )?blunting\b",
    ),
    "Pleural Other": (
        r"\bpleural (?:thickening|plaques?|calcifications?|scarring|reaction|abnormalit\w+)\b",
        r"\bfibrothorax\b",
        r"\bapical (?:pleural )?(?:cap|capping|thickening)\b",
    ),
    "Fracture": (r"\bfractur\w*", r"\bfx\b"),
    "Support Devices": (
        r"\b(?:endotracheal|et|tracheostomy|trach|enteric|nasogastric|ng|og|orogastric|feeding|dobhoff|"
        r"chest|mediastinal|drainage|gastrostomy|nasoenteric) tubes?\b",
        r"\btubes?\b",
        r"\bett\b",
        r"\b(?:central|venous|ij|jugular|subclavian|picc|midline|dialysis|hickman|arterial|swan[- ]ganz|"
        r"pulmonary artery) (?:lines?|catheters?)\b",
        r"\bpicc\b",
        r"\bcatheters?\b",
        r"\bport[- ]?a[- ]?cath\b",
        r"\b(?:pacemaker|pacer|aicd|icd|defibrillator)s?\b",
        r"\b(?:pacing|pacer) (?:leads?|wires?)\b",
        r"\b(?:sternotomy|sternal|cerclage) wires\b",
        r"\b(?:surgical )?clips\b",
        r"\bstents?\b",
        r"\b(?:prosthetic|mechanical) (?:heart )?valves?\b",
        r"\bvalve replacement\b",
        r"\bhardware\b",
        r"\bdrains?\b",
        r"\b(?:lvad|ventricular assist device)\b",
        r"\b(?:support|medical|monitoring) devices?\b",
    ),
}

NORMAL_STATEMENTS = {
    "Enlarged Cardiomediastinum": (subject_state(_MEDIASTINUM, _NORMAL_STATES),),
    "Cardiomegaly": (subject_state(_HEART, _NORMAL_STATES),),
    "Pleural Effusion": (r"\b(?:costophrenic|cp) (?:angles?|sulci) (?:are |is )?(?:sharp|clear)\b",),
}

UNMENTIONS = {
    "Lung Lesion": (r"\bmass effect\b",),
    "Edema": (r"\b(?:soft tissue|subcutaneous|facial|peripheral|extremity|chest wall) (?:o?edema)\b",),
    "Pleural Effusion": (r"\b(?:pericardial|joint|knee|shoulder) effusions?\b",),
    "Support Devices": (r"\b(?:bronchial|eustachian) tubes?\b",),
}

# Cues. "Before" cues reach forward to a mention later in the clause, "after" cues reach back.
PRE_NEGATION_UNCERTAINTY = (
    r"\b(?:cannot|can ?not|can't|could not|may not|not) (?:be )?(?:entirely |completely |totally )?"
    r"(?:excluded?|ruled? out)\b",
    r"\b(?:difficult|hard) to (?:exclude|rule out)\b",
)
NEGATION_BEFORE = (
    r"\bno\b",
    r"\bnot\b",
    r"\bwithout\b",
    r"\bnegative for\b",
    r"\bfree of\b",
    r"\babsence of\b",
    r"\babsent\b",
    r"\bresolution of\b",
    r"\bresolved\b",
    r"\bclear of\b",
    r"\bremoval of\b",
    r"\bneither\b",
    r"\bnor\b",
    r"\brather than\b",
)
NEGATION_AFTER = (
    r"\b(?:is |are |was |were |has been |have been )?(?:not (?:seen|identified|present|visualized|visible|"
    r"appreciated|demonstrated|evident|noted|detected|shown)|absent|resolved|cleared|removed|"
    r"no longer (?:seen|present|visible|evident|identified|demonstrated|appreciated)|excluded|ruled out)\b",
)
UNCERTAINTY_BEFORE = (
    r"\b(?:may|might|could)\b",
    r"\bpossibl[ey]\b",
    r"\bprobabl[ey]\b",
    r"\blikely\b",
    r"\bsuspicious\b",
    r"\bsuspect\w*",
    r"\bconcern\w*",
    r"\bquestion\w*",
    r"\bsuggest\w*",
    r"\bconsider\w*",
    r"\bdifferential\b",
    r"\bversus\b|\bvs\b",
    r"\bborderline\b",
    r"\bequivocal\b",
    r"\bindeterminate\b",
    r"\bpresum\w+",
    r"\buncertain\b",
    r"\bperhaps\b",
    r"\bmaybe\b",
    r"\bworrisome\b",
    r"\brule out\b|\br/o\b",
    r"\b(?:evaluate|assess) for\b",
)
UNCERTAINTY_AFTER = (
    # Only at the end of the clause: in "opacity is likely atelectasis" the cue belongs to what follows.
    r"\b(?:is|are|seems|appears)(?: to be)? (?:likely|possible|probable|questionable)\b(?!\s+\w)",
    r"\b(?:suspected|questioned)\b",
    r"\b(?:may|might|could) be\b",
    r"\bversus\b|\bvs\b",
)
# Negation words that do not negate: "no change in the effusion" reports an effusion.
PSEUDO_NEGATION = (
    r"\bno (?:significant |interval |definite )?(?:change|increase|decrease|worsening)\b",
    r"\bnot (?:significantly )?(?:changed|increased|decreased)\b",
    r"\bwithout (?:significant |interval )?change\b",
    r"\bnot only\b",
)

# Where a cue's scope ends: a new clause. Sentences are cut into clauses here before anything else is read.
CLAUSE_BREAKS = (
    r";|\b(?:but|however|although|though|whereas|except|other than|aside from|apart from|which)\b"
    r"|(?=\bthere (?:is|are)\b)"
)
# A negation or uncertainty reaching forward stops at a verb ("no effusion is seen and the heart is enlarged")
# and does not cross a comma into a segment that starts like a new finding ("no pneumothorax, small effusion").
FORWARD_SCOPE_STOP = r"\b(?:is|are|was|were)\b"
NEW_FINDING_START = (
    r"(?:small|moderate|large|mild|mildly|severe|minimal|trace|tiny|there|the|a|an|stable|new|persistent|unchanged|"
    r"increased|decreased|interval|improved|improving|worsening|worsened|again|likely|probable|possible|with)\b"
)
