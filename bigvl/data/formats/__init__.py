"""Record formats on top of `bigvl.data.stream`: each module turns one kind of record into examples.

A format gives the stream a `parse` (record bytes -> example dict, or `stream.RecordFailure` with
one of its `REASONS`) and a `collate` (examples -> batch), and wraps `stream.train_stream` and
`stream.eval_stream` in its own `train_dataset` and `eval_examples`.

  image_text   id / image / caption records (`bigvl.data.formats.records`): contrastive image-text training
"""
