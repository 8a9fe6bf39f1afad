def convert(model, filter_fn=None):
    raise NotImplementedError
