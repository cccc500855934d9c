"""Word lists and price levels of the synthetic shop's categories.

Pure data for :mod:`training.synthetic_catalog`. Each category has its own
product nouns, adjectives and attributes, so that titles and descriptions of
items in one category share words (a text embedding finds them close) while
items of different categories share almost none. ``consumable`` categories are
bought again and again (coffee, pet food); their shoppers come back to re-buy.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATEGORY_SPECS", "CategorySpec", "GENERIC_PHRASES"]


@dataclass(frozen=True, slots=True)
class CategorySpec:
    """One named category of the synthetic catalog.

    Parameters
    ----------
    name : str
        Category label as it appears in :class:`features.events.CatalogItem`.
    median_price : float
        Median of the category's lognormal price distribution.
    price_sigma : float
        Log-scale spread of the prices.
    consumable : bool
        Whether shoppers re-buy the same item after a while.
    nouns, adjectives, attributes : tuple of str
        Words that titles and descriptions of this category are built from.
    """

    name: str
    median_price: float
    price_sigma: float
    consumable: bool
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    attributes: tuple[str, ...]


def _spec(name: str, price: float, sigma: float, consumable: bool, nouns: str, adjectives: str,
          attributes: str) -> CategorySpec:
    return CategorySpec(name, price, sigma, consumable, tuple(nouns.split(",")),
                        tuple(adjectives.split(",")), tuple(attributes.split(",")))


#: Every category the generator can use, in a fixed order (a shop of
#: ``n_categories`` draws its subset from this tuple with its seed).
CATEGORY_SPECS: tuple[CategorySpec, ...] = (
    _spec("coffee", 12.0, 0.35, True,
          "coffee beans,ground coffee,espresso pods,cold brew,instant coffee,decaf blend",
          "dark roast,medium roast,single origin,arabica,smooth,bold",
          "fair trade,whole bean,notes of chocolate,low acidity,freshly roasted,resealable bag"),
    _spec("tea", 8.0, 0.35, True,
          "green tea,black tea,herbal infusion,chai blend,matcha powder,oolong",
          "loose leaf,organic,fragrant,soothing,spiced,ceremonial",
          "caffeine free,biodegradable bags,hand picked,mountain grown,floral aroma,steep three minutes"),
    _spec("pet food", 25.0, 0.45, True,
          "dry dog food,wet cat food,puppy kibble,dental chews,cat treats,bird seed",
          "grain free,high protein,salmon,chicken,senior,hypoallergenic",
          "vet approved,no artificial colours,resealable pouch,for sensitive stomachs,omega oils,large breed"),
    _spec("skincare", 22.0, 0.5, True,
          "face serum,moisturiser,cleansing gel,eye cream,sunscreen,night mask",
          "hydrating,gentle,vitamin c,retinol,fragrance free,brightening",
          "dermatologist tested,for dry skin,spf fifty,vegan formula,hyaluronic acid,non comedogenic"),
    _spec("haircare", 14.0, 0.4, True,
          "shampoo,conditioner,hair oil,styling gel,dry shampoo,hair mask",
          "nourishing,volumising,argan,sulfate free,curl defining,repairing",
          "for coloured hair,salon formula,silicone free,anti frizz,keratin,scalp care"),
    _spec("baby care", 18.0, 0.45, True,
          "nappies,baby wipes,baby lotion,teething gel,bottle set,sleep suit",
          "soft,sensitive,newborn,unscented,organic cotton,hypoallergenic",
          "paediatrician approved,size two,ultra absorbent,bpa free,gentle on skin,night time"),
    _spec("snacks", 5.0, 0.4, True,
          "protein bar,trail mix,potato crisps,dark chocolate,rice cakes,dried mango",
          "salted,crunchy,sweet,spicy,roasted,low sugar",
          "family pack,gluten free,high fibre,sea salt,multipack,no palm oil"),
    _spec("cleaning", 9.0, 0.4, True,
          "laundry detergent,dish tablets,surface spray,fabric softener,sponges,toilet cleaner",
          "eco,concentrated,lemon,lavender,streak free,antibacterial",
          "plant based,refill pack,sixty washes,septic safe,fresh scent,tough on grease"),
    _spec("running", 85.0, 0.45, False,
          "running shoes,trail shoes,running tights,sports watch,hydration vest,running jacket",
          "lightweight,cushioned,breathable,reflective,waterproof,responsive",
          "carbon plate,heel drop eight millimetres,gps tracking,wide fit,marathon ready,grippy outsole"),
    _spec("yoga", 35.0, 0.5, False,
          "yoga mat,yoga blocks,leggings,meditation cushion,yoga strap,sports bra",
          "non slip,eco,stretchy,cork,extra thick,seamless",
          "alignment lines,high waist,supportive,travel size,natural rubber,squat proof"),
    _spec("cycling", 120.0, 0.7, False,
          "bike helmet,bike lights,cycling gloves,bike lock,saddle bag,cycling jersey",
          "aero,ventilated,usb rechargeable,padded,heavy duty,high visibility",
          "mips protection,five hundred lumens,gold security rating,quick release,road bike,gravel ready"),
    _spec("camping", 60.0, 0.7, False,
          "tent,sleeping bag,camping stove,headlamp,trekking poles,camping chair",
          "ultralight,four season,compact,insulated,foldable,rugged",
          "two person,down fill,packs small,water resistant,comfort rated minus five,quick pitch"),
    _spec("kitchen", 40.0, 0.6, False,
          "chef knife,frying pan,cutting board,mixing bowls,dutch oven,measuring cups",
          "stainless steel,non stick,cast iron,bamboo,ceramic,professional",
          "dishwasher safe,induction compatible,oven safe,ergonomic handle,lifetime warranty,even heating"),
    _spec("coffee gear", 55.0, 0.7, False,
          "grinder,pour over dripper,french press,milk frother,espresso machine,kettle",
          "burr,gooseneck,glass,manual,programmable,barista",
          "precise temperature,stepless grind,double wall,pressure gauge,brews four cups,descaling alert"),
    _spec("home decor", 30.0, 0.6, False,
          "scented candle,throw pillow,wall art,vase,picture frame,table lamp",
          "minimalist,boho,velvet,handmade,scandinavian,vintage",
          "warm light,linen texture,ready to hang,hand poured,neutral tones,gift ready"),
    _spec("bedding", 65.0, 0.5, False,
          "duvet cover,pillow,mattress topper,fitted sheet,weighted blanket,bedspread",
          "cooling,percale,memory foam,organic cotton,linen,hotel quality",
          "king size,breathable weave,machine washable,deep pocket,temperature regulating,thread count four hundred"),
    _spec("gardening", 25.0, 0.6, False,
          "seed kit,pruning shears,watering can,raised bed,plant pots,garden gloves",
          "heirloom,ergonomic,galvanised,terracotta,self watering,thorn proof",
          "for tomatoes,easy grow,drainage holes,rust resistant,balcony friendly,perennial"),
    _spec("tools", 45.0, 0.7, False,
          "cordless drill,screwdriver set,tape measure,spirit level,tool box,socket set",
          "brushless,magnetic,heavy duty,compact,precision,professional grade",
          "two batteries,chrome vanadium,fifty piece,led work light,torque control,carry case"),
    _spec("audio", 90.0, 0.8, False,
          "headphones,earbuds,bluetooth speaker,soundbar,turntable,microphone",
          "wireless,noise cancelling,portable,hi fi,waterproof,studio",
          "thirty hour battery,deep bass,usb c charging,multipoint pairing,low latency,built in mic"),
    _spec("phone accessories", 18.0, 0.6, False,
          "phone case,screen protector,charging cable,power bank,wireless charger,car mount",
          "slim,shockproof,fast charging,magnetic,tempered glass,braided",
          "twenty watt,drop tested,ten thousand mah,for iphone,for android,lifetime cable"),
    _spec("computer accessories", 40.0, 0.6, False,
          "mechanical keyboard,wireless mouse,usb hub,laptop stand,webcam,monitor arm",
          "ergonomic,rgb,aluminium,adjustable,silent,ultra thin",
          "hot swappable switches,full hd,seven ports,gas spring,plug and play,for macbook"),
    _spec("gaming", 55.0, 0.7, False,
          "game controller,gaming headset,gaming mouse,console stand,capture card,mouse pad",
          "pro,wireless,rgb,low latency,tournament,precision",
          "adjustable dpi,surround sound,hall effect sticks,cooling fan,extended size,cross platform"),
    _spec("books", 14.0, 0.35, False,
          "novel,cookbook,biography,travel guide,comic,children book",
          "bestselling,illustrated,award winning,hardcover,paperback,collected",
          "first edition,signed copy,large print,with recipes,graphic novel,bedtime stories"),
    _spec("toys", 25.0, 0.6, False,
          "building blocks,puzzle,plush toy,board game,remote car,craft kit",
          "educational,wooden,colourful,stem,cuddly,family",
          "ages three plus,five hundred pieces,battery operated,for two to six players,non toxic paint,creative play"),
    _spec("jewellery", 70.0, 0.8, False,
          "necklace,earrings,bracelet,ring,pendant,watch",
          "sterling silver,gold plated,minimalist,gemstone,handcrafted,rose gold",
          "adjustable chain,nickel free,gift box,hypoallergenic,engravable,stackable"),
    _spec("womens fashion", 45.0, 0.55, False,
          "summer dress,blouse,knit sweater,denim jeans,trench coat,skirt",
          "floral,oversized,linen,high rise,wrap,pleated",
          "relaxed fit,midi length,sustainable fabric,button front,machine washable,tailored"),
    _spec("mens fashion", 50.0, 0.55, False,
          "oxford shirt,chinos,hoodie,wool coat,polo shirt,denim jacket",
          "slim fit,organic cotton,merino,classic,washed,heavyweight",
          "regular fit,stretch fabric,button down collar,brushed interior,double stitched,easy iron"),
    _spec("shoes", 75.0, 0.5, False,
          "sneakers,leather boots,loafers,sandals,slippers,chelsea boots",
          "suede,waterproof,minimalist,chunky,handmade,vegan leather",
          "memory foam insole,rubber sole,half sizes,goodyear welted,slip on,wide fit"),
    _spec("bags", 60.0, 0.6, False,
          "backpack,tote bag,duffel bag,laptop sleeve,crossbody bag,wallet",
          "leather,canvas,water resistant,roll top,compact,recycled",
          "padded laptop pocket,twenty litre,rfid blocking,lifetime guarantee,luggage strap,hidden pocket"),
    _spec("art supplies", 20.0, 0.55, False,
          "watercolour set,sketchbook,acrylic paints,brush set,coloured pencils,easel",
          "artist grade,vibrant,acid free,blendable,portable,student",
          "twenty four colours,heavyweight paper,synthetic bristles,lightfast,tabletop,refillable"),
)

#: Filler phrases shared by all categories (so descriptions are not pure keyword lists).
GENERIC_PHRASES: tuple[str, ...] = (
    "a customer favourite",
    "great value",
    "new this season",
    "ships in two days",
    "thoughtfully designed",
    "made to last",
    "easy returns",
    "a perfect gift",
)
