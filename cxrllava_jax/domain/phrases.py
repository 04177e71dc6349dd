"""What the report labeler reads: mention phrases per observation and the cues that negate them or make them uncertain.

Written for this project after the design of the CheXpert labeler (Irvin et al., 2019): per observation,
phrases whose match is a mention, "unmention" phrases that look like a mention but are something else
(a pericardial effusion is not a pleural effusion), and three cue lists applied in the scope of a clause:
pre-negation uncertainty ("cannot exclude"), negation ("no", "without", "resolved"), post-negation
uncertainty ("may", "likely"). Added here: statements that carry their own state, negative ("heart size is
normal") or uncertain ("stable cardiomediastinal silhouette", "vascular congestion"), where the CheXpert labeler
reads the state from a dependency parse. All patterns are regex fragments matched on lower-cased text.

The vocabulary (which words mention which observation, which do not, and the other findings that rule out
"No Finding") follows the phrase lists `phrases/mention/*.txt` and `phrases/unmention/*.txt` of
stanfordmlgroup/chexpert-labeler (commit 44ddeb3), Copyright (c) 2018 Stanford Machine Learning Group,
MIT License (its text is at the end of this file). The patterns and code here are this project's own.
"""

# Words that may not sit between a subject and its state ("heart ... enlarged"): a clause turn, or the
# opposite state, so that "heart size is enlarged, lungs are normal" (or "the heart is large, ...") is not read as
# a normal heart.
_GAP_STOP = (r"(?:but|however|although|though|while|whereas|which|normal|unremarkable|enlarg\w*|widen\w*|increas\w*"
             r"|large|prominen\w*)\b")
_NORMAL_STATES = (
    r"normal(?! position)",
    r"unremarkable",
    r"within (?:the )?(?:normal limits|limits of normal)",
    r"(?:at )?(?:the )?upper limits? of normal",
    r"not (?:significantly )?(?:enlarged|widened)",  # "heart silhouette and mediastinal contours are not enlarged"
)


def subject_state(subjects, states, max_gap=4, before_gap=0):
    """'<subject> ... <state>' with at most `max_gap` words between ("heart size is mildly enlarged"),
    or '<state> ... <subject>' with at most `before_gap` ("enlarged heart")."""
    subject, state = "|".join(subjects), "|".join(states)
    gap = rf"(?:[\s,]+(?!{_GAP_STOP})[\w/'-]+){{0,{max_gap}}}?[\s,]+"
    before = rf"(?:[\s,]+(?!{_GAP_STOP})[\w/'-]+){{0,{before_gap}}}?[\s,]+"
    return rf"\b(?:{subject})\b{gap}(?:{state})\b|\b(?:{state}){before}(?:{subject})\b"


_HEART = (
    r"heart(?: size)?",
    r"cardiac (?:silhouette|size|contours?|shadow)",
    r"size of the heart",
    r"heart silhouette",
)
_HEART_SIZE = (r"(?:heart|cardiac) size", r"size of the heart")
_MEDIASTINUM = (
    r"cardiomediastinal(?: silhouettes?| contours?| structures| size| width)?",
    r"cardiomediastinum",
    r"(?:upper |superior )?mediastinum",
    r"mediastinal (?:and hilar )?(?:silhouettes?|contours?|width|structures|configuration)",
    r"(?:cardiac|heart|hilar) contours?",  # the CheXpert labeler's phrase "contour" reads any contour
    r"pericardial silhouette",
)
# "Stable heart size", "the cardiomediastinal silhouette is unchanged": the CheXpert labeler calls these uncertain
# (the size is compared with a study the reader cannot see); "borderline heart size" likewise, but "borderline
# cardiomegaly" and "the heart is borderline enlarged" are positive there.
_STABLE_STATES = (r"stable", r"unchanged", r"not changed", r"similar to (?:the )?prior")
# Its rule reads the state of the silhouette, whatever else is said of it ("stable enlarged cardiac silhouette",
# "heart size and mediastinal contours are unchanged", "stable appearance of the cardiomediastinal silhouette"), so
# the words between may only be those of such a list: "the heart is enlarged, with stable effusion" is no stable heart.
_SILHOUETTE_WORDS = (r"(?:the|and|or|of|in|is|are|remains?|appears?|again|also|otherwise|overall|both|grossly|appearance|size|"
                     r"heart|cardiac|mediastinal|cardiomediastinal|mediastinum|hilar|hila|contours?|silhouettes?|"
                     r"configuration|width|pulmonary|vascularity|vasculature|superior|upper|non-?enlarged|mild|mildly|moderate|moderately|marked|"
                     r"markedly|enlarged|borderline|prominent)")


def stable_statement(subjects):
    """'<subject> ... stable' or 'stable ... <subject>' across the words of a cardiomediastinal list only."""
    subject, state = "|".join(subjects), "|".join(_STABLE_STATES)
    return (rf"\b(?:{subject})\b(?:[\s,]+{_SILHOUETTE_WORDS}){{0,8}}?[\s,]+(?:{state})\b"
            rf"|\b(?:{state})(?:[\s,]+{_SILHOUETTE_WORDS}){{0,3}}?[\s,]+(?:{subject})\b")

MENTIONS = {
    "Enlarged Cardiomediastinum": (
        subject_state(_MEDIASTINUM, (r"enlarged", r"enlargement", r"widened", r"widening", r"wide", r"prominent")),
        r"\b(?:cardio)?mediastinal (?:widening|enlargement)\b",
        # Its phrase " mediastinum" is a mention however the enlargement is worded: "widening of the mediastinum".
        r"\b(?:widening|enlargement|prominence) of (?:the )?(?:superior |upper )?(?:cardio)?mediastin"
        r"(?:um|al (?:silhouette|contours?))\b",
    ),
    "Cardiomegaly": (
        r"\bcardiomegaly\b",
        r"\b(?:cardiac|heart) enlargement\b",
        r"\benlargement of the (?:heart|cardiac silhouette)\b",
        # Its "heart size" is a mention in any sentence: "interval increase in heart size".
        r"\bincrease(?:d)? in (?:the )?(?:(?:heart|cardiac) size|size of the (?:heart|cardiac silhouette))\b",
        subject_state(_HEART, (r"enlarged", r"increased", r"large", r"prominent", r"borderline")),
    ),
    "Lung Lesion": (
        r"\bnodul(?:e|es|ar|arity)\b",
        r"\bmass(?:es)?\b",
        r"\blumps?\b",
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
        r"\bdecreased translucency\b",
        r"\bhaziness\b",
        r"\bground[- ]glass\b",
        r"\breticula\w*",
        r"\binterstitial (?:markings?|opacit\w+|prominence|pattern|disease|lung|abnormalit\w+|thickening)\b",
        r"\bperibronchial (?:wall )?thickening\b",
        r"\bscar(?:s|ring)?\b",
        r"\bfibro(?:sis|tic)\b",
    ),
    "Edema": (
        r"\boedema\b|\bedema\b",
        r"\bcongestive heart failure\b|\bheart failure\b",
        r"\bchf\b",
        r"\bfluid overload\b",
    ),
    "Consolidation": (r"\bconsolidat\w*",),
    "Pneumonia": (
        r"\b(?:broncho)?pneumoni(?:a|as|ae|tis)\b",
        r"\binfect(?:ion|ions|ious)\b",
    ),
    "Atelectasis": (
        r"\batelecta\w+",
        r"\b(?:lobar|lobe|lung|segmental|subsegmental) collapse\b",
        r"\bcollapse of the\b",
        r"\bcollapsed\b",
    ),
    "Pneumothorax": (r"\b(?:hydro|hemo|haemo)?pneumothora(?:x|ces)\b", r"\bptx\b"),
    "Pleural Effusion": (
        r"\beffusions?\b",
        r"\bpleural fluid\b",
        r"\b(?:hydrothorax|hydropneumothorax)\b",
        r"\bblunt(?:ing|ed) (?:of )?(?:the )?(?:left |right |bilateral )?(?:costophrenic|cp) "
        r"(?:angles?|sulci|sulcus)\b",
        r"\bcostophrenic (?:angle |sulcus )?blunting\b",
    ),
    "Pleural Other": (
        r"\bpleural (?:thickening|plaques?|calcifications?|scarring|scar|reaction|abnormalit\w+)\b",
        r"\bpleuro-?(?:parenchymal|pericardial) scar\w*",
        r"\bpleural[- ]parenchymal scar\w*",
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
        r"\bcannulas?\b",
        r"\bport[- ]?a?[- ]?cath(?:eter)?s?\b|\bmediport\b",  # its "catheter" inside "portacatheter"
        r"\b(?:pacemaker|pacer|aicd|icd|defib(?:rillator)?)s?\b",
        r"\b(?:pacing|pacer) (?:leads?|wires?)\b",
        # Sternotomy wires, surgical clips and stents are not among the CheXpert labeler's device phrases; valves,
        # markers, lines, devices and equipment are, whatever word comes before them.
        r"\bcoils?\b",
        r"\bvalves?\b",
        r"\bmarkers?\b",
        r"\blines?\b",
        r"\bdevices?\b",
        r"\bequipment\b",
        r"\bhardware\b|\bapparatus\b",
        r"\bplates?\b(?![- ]like| of)|\bscrews?\b",
        r"\barthroplast\w+",
        r"\bdrains?\b",
        r"\b(?:lvad|ventricular assist device)\b",
    ),
}

# A normal state reaches every subject of a list, as the CheXpert labeler's dependency patterns do ("heart size,
# mediastinal contour and pulmonary vascularity are within normal limits"; "normal heart size and mediastinal
# contours"); "normal in size and contour" also negates the mediastinum (its phrase list has "contour").
NORMAL_STATEMENTS = {
    "Enlarged Cardiomediastinum": (subject_state(_MEDIASTINUM, _NORMAL_STATES, max_gap=8, before_gap=3),
                                   r"\bnormal in size and (?:contour|configuration)\b"),
    "Cardiomegaly": (subject_state(_HEART, _NORMAL_STATES, max_gap=8, before_gap=3),
                     r"\bnormal (?:size|size and (?:contour|configuration)) of the (?:heart|cardiac silhouette)\b"),
    "Pleural Effusion": (r"\b(?:costophrenic|cp) (?:angles?|sulci) (?:are |is )?(?:sharp|clear)\b",),
}
UNCERTAIN_STATEMENTS = {
    "Enlarged Cardiomediastinum": (stable_statement(_MEDIASTINUM),),
    "Cardiomegaly": (stable_statement(_HEART), r"\bborderline (?:heart|cardiac) size\b",
                     # The size is borderline, the heart is not said to be enlarged: "heart size is borderline".
                     subject_state(_HEART_SIZE, (r"borderline(?!\s+(?:enlarg|large|cardiomegaly|normal))",), max_gap=2)),
    # Signs that may or may not be edema: uncertain unless negated ("no vascular congestion").
    "Edema": (
        r"\bvascular (?:congestion|prominence)\b",
        r"\bpulmonary congestion\b",
        r"\bindistinctness\b",
    ),
}

# Findings outside the 14 observations: a positive or uncertain one means the study has a finding, so
# "No Finding" is not positive (the CheXpert labeler's `no_finding.txt`).
OTHER_FINDINGS = (
    r"\bemphysem\w*", r"\bblunt\w*", r"\bdensit(?:y|ies)\b", r"\belevat(?:ion|ed)\b", r"\beventration\b",
    r"\b(?:kypho|dextro|levo|roto)?scolio\w*", r"\bdegenera\w*", r"\bcalcifi\w*", r"\bhyperinflat\w*",
    r"\bhyperexpan\w*", r"\bbronchospasm\b",
    r"\basthma\b", r"\bhernia\w*", r"\bcopd\b", r"\binterstitial markings?\b", r"\bplaques?\b", r"\bosteophyt\w*",
    r"\baortic disease\b", r"\bbronchiolitis\b", r"\bairways? disease\b", r"\bthickening\b", r"\bcephalization\b",
    r"\baspiration\b", r"\bbullae\b", r"\bcontusion\b", r"\batherosclero\w*", r"\bosteopeni\w*", r"\bmetastas[ie]s\b",
    r"\bgranulom\w*", r"\bpneumomediastinum\b", r"\bpneumoperitoneum\b", r"\bosteodystrophy\b", r"\bcuffing\b",
    r"\birregular lucency\b", r"\binflam\w*", r"\bfissures?\b", r"\bhypertension\b", r"\bprominen\w*", r"\bkyphosis\b",
    r"\bbullets?\b", r"\bthoracentesis\b", r"\bbronchitis\b", r"\bvolume loss\b", r"\bdeformit\w*", r"\bhemorrhage\b",
    r"\bhematoma\b", r"\bradiopaque\b", r"\baerophagia\b", r"\barthropathy\b", r"\btracheostomy\b",
    r"\bdefib\w*",  # in its list as well as among the devices: a defibrillator rules out No Finding there
    # Added here: common chronic findings the CheXpert list lacks, which make a study abnormal all the same.
    r"\btortu\w+", r"\becta(?:sia|tic)\b", r"\bspondylo\w+", r"\b(?:low|decreased) lung volumes?\b",
    r"\bhypo(?:inflat|ventilat|expan)\w*", r"\bcurvature\b", r"\barthriti\w*", r"\bforeign bod(?:y|ies)\b",
    r"\b(?:mastectomy|cholecystectomy|lobectomy|pneumonectomy)\b",
    r"\bcrowding\b", r"\bunfold\w*", r"\bdish\b", r"\bfusion\b",
)

def _positional(subjects):
    return rf"\b(?:over|overly|overlying|in|within) the (?:superior |left |right )?(?:{'|'.join(subjects)})\b"


UNMENTIONS = {
    # Its positional unmentions: what lies over or in the heart or the mediastinum is something else.
    "Cardiomegaly": (_positional(_HEART),),
    "Enlarged Cardiomediastinum": (_positional(_MEDIASTINUM),),
    "Lung Lesion": (r"\bmass effect\b", r"\bcalcified nodul\w*", r"\bmassive\b"),
    # An old, healed infection is a granuloma, not a pneumonia.
    "Pneumonia": (r"\b(?:granulomatous|prior|previous|old|remote|healed|tuberculous|tuberculosis|tb) (?:[\w-]+ )?infect\w+",),
    "Lung Opacity": (r"\bpleural (?:scar|scarring)\b", r"\bpleuro-?parenchymal scar\w*"),
    "Edema": (r"\b(?:soft tissue|subcutaneous|facial|peripheral|extremity|chest wall) (?:o?edema)\b",),
    "Pleural Effusion": (r"\b(?:pericardial|joint|knee|shoulder) effusions?\b",),
    "Support Devices": (r"\b(?:bronchial|eustachian) tubes?\b",
                        r"\b(?:kerley(?: [a-c])?|[a-c]-|septal|pleural|fissural|skin|junction|paraspinal|paratracheal) ?lines?\b"),
}

# Cues. "Before" cues reach forward to a mention later in the clause, "after" cues reach back.
PRE_NEGATION_UNCERTAINTY = (
    r"\b(?:cannot|can ?not|can't|could not|may not|not) (?:be )?(?:entirely |completely |totally )?"
    r"(?:excluded?|ruled? out)\b",
    r"\b(?:difficult|hard) to (?:completely |entirely |totally |definitely )?(?:exclude|rule out)\b",
    r"\bno new\b",  # "no new consolidation" leaves an old one possible
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
    r"\bclear(?:ing)? of\b",
    r"\b(?:removal|history|disappearance|drainage) of\b",
    r"\bneither\b",
    r"\bnor\b",
    r"\brather than\b",
)
NEGATION_AFTER = (
    r"\b(?:is |are |was |were |has been |have been )?(?:not (?:seen|identified|present|visible|"
    r"demonstrated|evident|noted|detected|shown)|absent|resolved|cleared|removed|"
    r"no longer (?:seen|present|visible|evident|identified|demonstrated|appreciated)|excluded|ruled out)\b",
    r"\b(?:appears? |is |are )?within (?:the )?(?:normal limits|limits of normal)\b",
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
    r"\bsuggest\w*",  # the CheXpert labeler reads only "suggestion of": see the labeler's docstring
    r"\bconsider(?:ed|ation)?\b",
    r"\bdifferential\b(?:[^;]*?\bincludes?\b)?",  # its "differential diagnosis includes X", with words between
    r"\bversus\b|\bvs\b",
    r"\bequivocal\b",
    r"\bindeterminate\b",
    r"\bpresum\w+",
    r"\buncertain\b",
    r"\bperhaps\b",
    r"\bmaybe\b",
    r"\bworrisome\b",
    r"\brule out\b|\br/o\b",
    r"\b(?:evaluate|assess) for\b",
    r"\bcorrelat\w* (?:clinically )?(?:for|as to)\b",  # its "correlate clinically for (symptoms of) X"
    # Its "X is poorly / incompletely evaluated", said of the evaluation: "evaluation for pneumothorax is limited".
    r"\b(?:evaluation|assessment) (?:for|of) (?=(?:[\w-]+ ){0,3}?[\w-]+ (?:is|are) (?:limited|suboptimal)\b)",
    r"\bobscuring\b",
    r"\bsecondary to\b",
    r"\b(?:is|are|be)(?: most| more| also)? compatible with\b",
    r"\bfavou?r(?:s|ed|ing)?\b",
)
UNCERTAINTY_AFTER = (
    # Only at the end of the clause: in "opacity is likely atelectasis" the cue belongs to what follows.
    r"\b(?:is|are|seems|appears)(?: to be)?(?: also| still)? (?:likely|possible|probable|questionable)\b(?!\s+\w)",
    r"\b(?:suspected|questioned)\b",
    r"\b(?:obscured|(?:poorly|incompletely|not well|not clearly) (?:evaluated|visualized|seen|assessed))\b",
    # What is not appreciated, visualized or evaluated may be there: the CheXpert labeler's uncertainty.
    r"\b(?:is |are |was |were )?not (?:appreciated|visualized|evaluated)\b",
    r"\b(?:is|are) less likely\b",
    r"\b(?:may|might|could) be\b",
    r"\bversus\b|\bvs\b",
    r"\b(?:is|are) in the differential\b",
    r"\bwould be a consideration\b",
    r"\b(?:is|are) (?:an?|another) (?:consideration|possibility)\b",
    r"\b(?:may|might|could|can) have (?:this|that|a similar|the same) appearance\b",
)
# Negation words that do not negate: "no change in the effusion" reports an effusion.
PSEUDO_NEGATION = (
    r"\bno (?:significant |interval |definite )*(?:change|increase|decrease|worsening)\b",
    r"\bnot (?:significantly )?(?:changed|increased|decreased)\b",
    r"\bwithout (?:significant |interval )*change\b",
    r"\bnot only\b",
)

# A device's tip that is not seen or is obscured says nothing of whether the device is there: the CheXpert
# labeler's cues attach to the tip, its patterns read the device's own node ("the tip of the catheter is not
# visualized", "enteric tube tip not seen": the device is present). A cue after a mention does not reach it across
# its tip, nor from after "tip of the <device>".
DEVICE_PART = r"\btips?\b"
DEVICE_PART_BEFORE = r"\btips? of (?:the |an? )?(?:[\w-]+ ){0,2}$"

# Where a cue's scope ends: a new clause. Sentences are cut into clauses here before anything else is read.
CLAUSE_BREAKS = (
    r";|\b(?:but|however|although|though|whereas|except|other than|aside from|apart from|which)\b"
    r"|(?=\bthere (?:is|are)\b)"
)
# A negation or uncertainty reaching forward stops at a verb ("no effusion is seen and the heart is enlarged")
# and does not cross a comma into a segment that starts like a new finding ("no pneumothorax, small effusion").
FORWARD_SCOPE_STOP = r"\b(?:is|are|was|were)\b"
# A cue reaching back stops at a verb too, and at the verbs that read one finding as another: in "consolidation may
# represent atelectasis versus infiltrate" the alternatives are atelectasis and infiltrate, the consolidation is seen
# (the CheXpert labeler's "versus" joins the two nouns of a conj:versus, its "may represent" marks the object only).
BACKWARD_SCOPE_STOP = (rf"{FORWARD_SCOPE_STOP}|\b(?:represent|reflect|indicat|suggest|favou?r)\w*"
                       r"|\b(?:consistent|compatible) with\b|\b(?:due|secondary) to\b")
NEW_FINDING_START = (
    r"(?:small|moderate|large|mild|mildly|severe|minimal|trace|tiny|there|the|a|an|stable|new|persistent|unchanged|"
    r"increased|decreased|interval|improved|improving|worsening|worsened|again|likely|probable|possible|with)\b"
)

# The licence of the CheXpert labeler's phrase lists that the vocabulary above follows:
#
# MIT License
#
# Copyright (c) 2018 Stanford Machine Learning Group
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
