"""One row's request and result: prompt and media, fetching, the answer, labels and its price."""
