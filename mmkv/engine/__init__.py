"""The engine: everything between the public ``Store`` and the bytes of the file.

Nothing here imports from the public face (``mmkv.store``, ``queue``, ``sequence``, ``cli``)
or from the crash-testing kit (``mmkv.crashkit``); they import from here.  Within the
engine, from the bottom up:

    shim        the compiled C core (``mmkv._native``) and the one errno -> exception mapper
    tunables    sizes and limits (split threshold, growth steps, timeouts)
    failpoints  named crash points the C core and the engine pass through (armed by the kit)
    layout      the file format: header, meta, records, slots, blocks; encoders and decoders
    mapping     the mapped file: map, remap, grow (fallocate), msync
    allocator   the heap's free lists (the only owner of block headers, links and footers)
    index       the extendible-hash index: directory, segments, splits, rebuilds
    transaction the journal and the commit of a transaction
    recovery    repair after a crash: verify records, rebuild index and free lists
    checker     the audit of every structure (``Store.check``)
    opening     the open/close protocol: who is first, who is last, byte locks on the file
"""
