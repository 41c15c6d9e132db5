class VUA: pass
class VUAConfig: pass
class ClosestKV: pass
