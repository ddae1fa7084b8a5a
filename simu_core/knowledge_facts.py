"""Plain data for the real-knowledge benchmark (`simu_core.knowledge`): public general knowledge only.

Each table is one record per line, fields separated by "|", alternatives by "/": the first
alternative is the answer, the others are also accepted when checking what a model knows
("Kyiv/Kiev"). "-" marks a fact left out (ambiguous, disputed or recently changed, e.g. the
currencies of Bulgaria and Croatia, or Mali's official language).

Continents follow the UN geoscheme, with Russia counted in Europe and Turkey, Kazakhstan, Armenia
and Azerbaijan in Asia; countries whose continent or capital is commonly disputed (Georgia, Cyprus,
Israel, Taiwan, Kosovo) and city-states named like their capital are left out.
"""

from __future__ import annotations

# country | name as written in a sentence | continent | capital | currency | official language
COUNTRIES = """
Afghanistan|Afghanistan|Asia|Kabul|afghani|Pashto/Dari
Armenia|Armenia|Asia|Yerevan|dram/Armenian dram|Armenian
Azerbaijan|Azerbaijan|Asia|Baku|manat/Azerbaijani manat|Azerbaijani/Azeri
Bahrain|Bahrain|Asia|Manama|Bahraini dinar/dinar|Arabic
Bangladesh|Bangladesh|Asia|Dhaka|taka/Bangladeshi taka|Bengali/Bangla
Bhutan|Bhutan|Asia|Thimphu|ngultrum/Bhutanese ngultrum|Dzongkha
Brunei|Brunei|Asia|Bandar Seri Begawan|Brunei dollar/dollar|Malay
Cambodia|Cambodia|Asia|Phnom Penh|riel/Cambodian riel|Khmer
China|China|Asia|Beijing/Peking|renminbi/yuan/Chinese yuan|Mandarin/Chinese/Standard Chinese/Mandarin Chinese
India|India|Asia|New Delhi/Delhi|Indian rupee/rupee|Hindi/English
Indonesia|Indonesia|Asia|Jakarta|Indonesian rupiah/rupiah|Indonesian/Bahasa Indonesia
Iran|Iran|Asia|Tehran|Iranian rial/rial|Persian/Farsi
Iraq|Iraq|Asia|Baghdad|Iraqi dinar/dinar|Arabic/Kurdish
Japan|Japan|Asia|Tokyo|yen/Japanese yen|Japanese
Jordan|Jordan|Asia|Amman|Jordanian dinar/dinar|Arabic
Kazakhstan|Kazakhstan|Asia|Astana/Nur-Sultan|tenge/Kazakhstani tenge|Kazakh/Russian
Kuwait|Kuwait|Asia|Kuwait City|Kuwaiti dinar/dinar|Arabic
Kyrgyzstan|Kyrgyzstan|Asia|Bishkek|som/Kyrgyzstani som|Kyrgyz/Russian
Laos|Laos|Asia|Vientiane|kip/Lao kip|Lao
Lebanon|Lebanon|Asia|Beirut|Lebanese pound/pound|Arabic
Malaysia|Malaysia|Asia|Kuala Lumpur|ringgit/Malaysian ringgit|Malay/Bahasa Malaysia
Maldives|the Maldives|Asia|Malé|rufiyaa/Maldivian rufiyaa|Dhivehi/Maldivian
Mongolia|Mongolia|Asia|Ulaanbaatar/Ulan Bator|tögrög/tugrik/Mongolian tögrög|Mongolian
Myanmar|Myanmar|Asia|Naypyidaw/Nay Pyi Taw|kyat/Burmese kyat|Burmese
Nepal|Nepal|Asia|Kathmandu|Nepalese rupee/rupee|Nepali
North Korea|North Korea|Asia|Pyongyang|North Korean won/won|Korean
Oman|Oman|Asia|Muscat|Omani rial/rial|Arabic
Pakistan|Pakistan|Asia|Islamabad|Pakistani rupee/rupee|Urdu/English
Philippines|the Philippines|Asia|Manila|Philippine peso/peso|Filipino/English/Tagalog
Qatar|Qatar|Asia|Doha|Qatari riyal/riyal|Arabic
Saudi Arabia|Saudi Arabia|Asia|Riyadh|Saudi riyal/riyal|Arabic
South Korea|South Korea|Asia|Seoul|South Korean won/won|Korean
Syria|Syria|Asia|Damascus|Syrian pound/pound|Arabic
Tajikistan|Tajikistan|Asia|Dushanbe|somoni/Tajikistani somoni|Tajik
Thailand|Thailand|Asia|Bangkok|baht/Thai baht|Thai
East Timor|East Timor|Asia|Dili|United States dollar/US dollar/dollar|Tetum/Portuguese
Turkey|Turkey|Asia|Ankara|Turkish lira/lira|Turkish
Turkmenistan|Turkmenistan|Asia|Ashgabat|manat/Turkmenistan manat|Turkmen
United Arab Emirates|the United Arab Emirates|Asia|Abu Dhabi|UAE dirham/dirham/Emirati dirham|Arabic
Uzbekistan|Uzbekistan|Asia|Tashkent|som/Uzbekistani som|Uzbek
Vietnam|Vietnam|Asia|Hanoi|dong/Vietnamese dong|Vietnamese
Yemen|Yemen|Asia|Sanaa/Sana'a|Yemeni rial/rial|Arabic
Albania|Albania|Europe|Tirana/Tirane|lek/Albanian lek|Albanian
Andorra|Andorra|Europe|Andorra la Vella|-|Catalan
Austria|Austria|Europe|Vienna|-|German
Belarus|Belarus|Europe|Minsk|Belarusian ruble/ruble/rouble|Belarusian/Russian
Belgium|Belgium|Europe|Brussels|-|Dutch/French/German
Bosnia and Herzegovina|Bosnia and Herzegovina|Europe|Sarajevo|convertible mark/mark|Bosnian/Croatian/Serbian
Bulgaria|Bulgaria|Europe|Sofia|-|Bulgarian
Croatia|Croatia|Europe|Zagreb|-|Croatian
Czech Republic|the Czech Republic|Europe|Prague|Czech koruna/koruna/crown|Czech
Denmark|Denmark|Europe|Copenhagen|Danish krone/krone|Danish
Estonia|Estonia|Europe|Tallinn|-|Estonian
Finland|Finland|Europe|Helsinki|-|Finnish/Swedish
France|France|Europe|Paris|euro|French
Germany|Germany|Europe|Berlin|euro|German
Greece|Greece|Europe|Athens|-|Greek
Hungary|Hungary|Europe|Budapest|forint/Hungarian forint|Hungarian
Iceland|Iceland|Europe|Reykjavik|Icelandic krona/krona|Icelandic
Ireland|Ireland|Europe|Dublin|-|Irish/English
Italy|Italy|Europe|Rome|euro|Italian
Latvia|Latvia|Europe|Riga|-|Latvian
Liechtenstein|Liechtenstein|Europe|Vaduz|Swiss franc/franc|German
Lithuania|Lithuania|Europe|Vilnius|-|Lithuanian
Malta|Malta|Europe|Valletta|-|Maltese/English
Moldova|Moldova|Europe|Chisinau|Moldovan leu/leu|Romanian/Moldovan
Montenegro|Montenegro|Europe|Podgorica|-|Montenegrin
Netherlands|the Netherlands|Europe|Amsterdam|-|Dutch
North Macedonia|North Macedonia|Europe|Skopje|denar/Macedonian denar|Macedonian
Norway|Norway|Europe|Oslo|Norwegian krone/krone|Norwegian
Poland|Poland|Europe|Warsaw|zloty/Polish zloty|Polish
Portugal|Portugal|Europe|Lisbon|-|Portuguese
Romania|Romania|Europe|Bucharest|Romanian leu/leu|Romanian
Russia|Russia|Europe|Moscow|Russian ruble/ruble/rouble|Russian
Serbia|Serbia|Europe|Belgrade|Serbian dinar/dinar|Serbian
Slovakia|Slovakia|Europe|Bratislava|-|Slovak
Slovenia|Slovenia|Europe|Ljubljana|-|Slovene/Slovenian
Spain|Spain|Europe|Madrid|euro|Spanish/Castilian
Sweden|Sweden|Europe|Stockholm|Swedish krona/krona|Swedish
Switzerland|Switzerland|Europe|Bern/Berne|Swiss franc/franc|German/French/Italian/Romansh
Ukraine|Ukraine|Europe|Kyiv/Kiev|hryvnia/Ukrainian hryvnia|Ukrainian
United Kingdom|the United Kingdom|Europe|London|pound sterling/pound/British pound/sterling|English
Egypt|Egypt|Africa|Cairo|Egyptian pound/pound|Arabic
Kenya|Kenya|Africa|Nairobi|Kenyan shilling/shilling|Swahili/English
Nigeria|Nigeria|Africa|Abuja|naira/Nigerian naira|English
Ethiopia|Ethiopia|Africa|Addis Ababa|birr/Ethiopian birr|Amharic
Ghana|Ghana|Africa|Accra|cedi/Ghanaian cedi|English
Morocco|Morocco|Africa|Rabat|Moroccan dirham/dirham|Arabic/Berber/Amazigh
Algeria|Algeria|Africa|Algiers|Algerian dinar/dinar|Arabic/Berber
Tunisia|Tunisia|Africa|Tunis|Tunisian dinar/dinar|Arabic
Senegal|Senegal|Africa|Dakar|CFA franc/West African CFA franc/franc|French
Uganda|Uganda|Africa|Kampala|Ugandan shilling/shilling|English/Swahili
Tanzania|Tanzania|Africa|Dodoma|Tanzanian shilling/shilling|Swahili/English
Zambia|Zambia|Africa|Lusaka|kwacha/Zambian kwacha|English
Angola|Angola|Africa|Luanda|kwanza/Angolan kwanza|Portuguese
Libya|Libya|Africa|Tripoli|Libyan dinar/dinar|Arabic
Madagascar|Madagascar|Africa|Antananarivo|ariary/Malagasy ariary|Malagasy/French
Rwanda|Rwanda|Africa|Kigali|Rwandan franc/franc|Kinyarwanda/English/French/Swahili
Somalia|Somalia|Africa|Mogadishu|Somali shilling/shilling|Somali/Arabic
Cameroon|Cameroon|Africa|Yaoundé|CFA franc/Central African CFA franc/franc|French/English
Canada|Canada|North America|Ottawa|Canadian dollar/dollar|English/French
United States|the United States|North America|Washington, D.C./Washington|United States dollar/US dollar/dollar|-
Mexico|Mexico|North America|Mexico City|Mexican peso/peso|Spanish
Cuba|Cuba|North America|Havana|Cuban peso/peso|Spanish
Jamaica|Jamaica|North America|Kingston|Jamaican dollar/dollar|English
Guatemala|Guatemala|North America|Guatemala City|quetzal/Guatemalan quetzal|Spanish
Honduras|Honduras|North America|Tegucigalpa|lempira/Honduran lempira|Spanish
Nicaragua|Nicaragua|North America|Managua|córdoba/Nicaraguan córdoba|Spanish
Costa Rica|Costa Rica|North America|San José|Costa Rican colón/colón|Spanish
Dominican Republic|the Dominican Republic|North America|Santo Domingo|Dominican peso/peso|Spanish
Haiti|Haiti|North America|Port-au-Prince|gourde/Haitian gourde|French/Haitian Creole
Brazil|Brazil|South America|Brasília|Brazilian real/real|Portuguese
Argentina|Argentina|South America|Buenos Aires|Argentine peso/peso|Spanish
Chile|Chile|South America|Santiago|Chilean peso/peso|Spanish
Peru|Peru|South America|Lima|sol/Peruvian sol/nuevo sol|Spanish/Quechua
Colombia|Colombia|South America|Bogotá|Colombian peso/peso|Spanish
Venezuela|Venezuela|South America|Caracas|bolívar/Venezuelan bolívar|Spanish
Ecuador|Ecuador|South America|Quito|United States dollar/US dollar/dollar|Spanish
Uruguay|Uruguay|South America|Montevideo|Uruguayan peso/peso|Spanish
Paraguay|Paraguay|South America|Asunción|guaraní/Paraguayan guaraní|Spanish/Guarani
Australia|Australia|Oceania|Canberra|Australian dollar/dollar|English
New Zealand|New Zealand|Oceania|Wellington|New Zealand dollar/dollar|English/Maori
Fiji|Fiji|Oceania|Suva|Fijian dollar/dollar|English/Fijian
Papua New Guinea|Papua New Guinea|Oceania|Port Moresby|kina/Papua New Guinean kina|English/Tok Pisin
"""

# landmark (as written in a sentence) | country it stands in | kind of answer (city or country) | answer
LANDMARKS = """
the Eiffel Tower|France|city|Paris
the Louvre|France|city|Paris
the Arc de Triomphe|France|city|Paris
the Colosseum|Italy|city|Rome
the Trevi Fountain|Italy|city|Rome
the Uffizi Gallery|Italy|city|Florence
the Rialto Bridge|Italy|city|Venice
Big Ben|United Kingdom|city|London
Buckingham Palace|United Kingdom|city|London
Tower Bridge|United Kingdom|city|London
the Brandenburg Gate|Germany|city|Berlin
the Acropolis|Greece|city|Athens
the Parthenon|Greece|city|Athens
the Kremlin|Russia|city|Moscow
the Hermitage Museum|Russia|city|St. Petersburg/Saint Petersburg
the Sagrada Familia|Spain|city|Barcelona
the Prado Museum|Spain|city|Madrid
the Alhambra|Spain|city|Granada
the Charles Bridge|Czech Republic|city|Prague
the Rijksmuseum|Netherlands|city|Amsterdam
the Atomium|Belgium|city|Brussels
the Statue of Liberty|United States|city|New York City/New York
the Empire State Building|United States|city|New York City/New York
the Golden Gate Bridge|United States|city|San Francisco
the Space Needle|United States|city|Seattle
the Gateway Arch|United States|city|St. Louis/Saint Louis
the CN Tower|Canada|city|Toronto
Christ the Redeemer|Brazil|city|Rio de Janeiro/Rio
the Forbidden City|China|city|Beijing/Peking
Tiananmen Square|China|city|Beijing/Peking
the Burj Khalifa|United Arab Emirates|city|Dubai
the Petronas Towers|Malaysia|city|Kuala Lumpur
the Hagia Sophia|Turkey|city|Istanbul
the Blue Mosque|Turkey|city|Istanbul
the Taj Mahal|India|city|Agra
the Gateway of India|India|city|Mumbai/Bombay
the Fushimi Inari Shrine|Japan|city|Kyoto
Machu Picchu|Peru|country|Peru
Chichen Itza|Mexico|country|Mexico
Teotihuacan|Mexico|country|Mexico
Stonehenge|United Kingdom|country|England/United Kingdom/UK/Britain/Great Britain
Neuschwanstein Castle|Germany|country|Germany
the Pyramids of Giza|Egypt|country|Egypt
Mount Kilimanjaro|Tanzania|country|Tanzania
the Serengeti|Tanzania|country|Tanzania
Table Mountain|South Africa|country|South Africa
Uluru|Australia|country|Australia
the Galapagos Islands|Ecuador|country|Ecuador
Easter Island|Chile|country|Chile
Angkor Wat|Cambodia|country|Cambodia
Petra|Jordan|country|Jordan
Mount Fuji|Japan|country|Japan
Borobudur|Indonesia|country|Indonesia
Ha Long Bay|Vietnam|country|Vietnam
Persepolis|Iran|country|Iran
"""

# work | author (all authors long dead or deceased public figures)
AUTHORS = """
Pride and Prejudice|Jane Austen/Austen
Hamlet|William Shakespeare/Shakespeare
Romeo and Juliet|William Shakespeare/Shakespeare
Macbeth|William Shakespeare/Shakespeare
Don Quixote|Miguel de Cervantes/Cervantes
War and Peace|Leo Tolstoy/Tolstoy/Lev Tolstoy
Anna Karenina|Leo Tolstoy/Tolstoy/Lev Tolstoy
Crime and Punishment|Fyodor Dostoevsky/Dostoevsky/Dostoyevsky/Fyodor Dostoyevsky
The Brothers Karamazov|Fyodor Dostoevsky/Dostoevsky/Dostoyevsky/Fyodor Dostoyevsky
The Odyssey|Homer
The Iliad|Homer
Moby-Dick|Herman Melville/Melville
Les Misérables|Victor Hugo/Hugo
The Divine Comedy|Dante Alighieri/Dante
Faust|Johann Wolfgang von Goethe/Goethe
Oliver Twist|Charles Dickens/Dickens
A Tale of Two Cities|Charles Dickens/Dickens
Great Expectations|Charles Dickens/Dickens
Nineteen Eighty-Four|George Orwell/Orwell
Animal Farm|George Orwell/Orwell
The Great Gatsby|F. Scott Fitzgerald/Scott Fitzgerald/Fitzgerald
Frankenstein|Mary Shelley/Mary Wollstonecraft Shelley
Dracula|Bram Stoker
The Adventures of Tom Sawyer|Mark Twain/Twain
Adventures of Huckleberry Finn|Mark Twain/Twain
Jane Eyre|Charlotte Brontë
Wuthering Heights|Emily Brontë
The Old Man and the Sea|Ernest Hemingway/Hemingway
Ulysses|James Joyce/Joyce
The Metamorphosis|Franz Kafka/Kafka
One Hundred Years of Solitude|Gabriel García Márquez/García Márquez
The Little Prince|Antoine de Saint-Exupéry/Saint-Exupéry
Madame Bovary|Gustave Flaubert/Flaubert
The Count of Monte Cristo|Alexandre Dumas/Dumas
The Three Musketeers|Alexandre Dumas/Dumas
Alice's Adventures in Wonderland|Lewis Carroll
Treasure Island|Robert Louis Stevenson
The Picture of Dorian Gray|Oscar Wilde/Wilde
The Raven|Edgar Allan Poe/Poe
Gulliver's Travels|Jonathan Swift/Swift
Robinson Crusoe|Daniel Defoe/Defoe
To Kill a Mockingbird|Harper Lee
The Catcher in the Rye|J. D. Salinger/J.D. Salinger/Salinger
Brave New World|Aldous Huxley/Huxley
The Lord of the Rings|J. R. R. Tolkien/J.R.R. Tolkien/Tolkien
The Hobbit|J. R. R. Tolkien/J.R.R. Tolkien/Tolkien
On the Origin of Species|Charles Darwin/Darwin
The Communist Manifesto|Karl Marx/Marx/Karl Marx and Friedrich Engels
A Brief History of Time|Stephen Hawking/Hawking
The Republic|Plato
The Prince|Niccolò Machiavelli/Machiavelli
"""

# element | chemical symbol
SYMBOLS = """
gold|Au
silver|Ag
iron|Fe
copper|Cu
lead|Pb
sodium|Na
potassium|K
oxygen|O
hydrogen|H
carbon|C
nitrogen|N
helium|He
neon|Ne
calcium|Ca
magnesium|Mg
zinc|Zn
tin|Sn
mercury|Hg
uranium|U
sulfur|S
chlorine|Cl
fluorine|F
phosphorus|P
silicon|Si
aluminium|Al
platinum|Pt
nickel|Ni
lithium|Li
tungsten|W
iodine|I
chromium|Cr
cobalt|Co
manganese|Mn
argon|Ar
titanium|Ti
barium|Ba
radon|Rn
plutonium|Pu
bismuth|Bi
arsenic|As
"""

# family -> (prompt, paraphrased prompts); {x} is the subject as written in a sentence, {X} the same
# with a capital first letter, {xs} its possessive.
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "capital": ("The capital of {x} is", ("The capital city of {x} is", "{Xs} capital city is")),
    "currency": ("The currency of {x} is the", ("The official currency of {x} is the", "In {x}, people pay with the")),
    "language": ("The official language of {x} is", ("The main language spoken in {x} is", "Most people in {x} speak")),
    "landmark_city": ("{X} is located in the city of", ("{X} stands in the city of", "You can visit {x} in the city of")),
    "landmark_country": ("{X} is located in the country of", ("{X} is found in the country of", "To see {x}, you travel to")),
    "author": ("{X} was written by", ("The author of {x} is", "{X} is a work by")),
    "symbol": ("The chemical symbol of {x} is", ("The symbol of the chemical element {x} is", "In the periodic table, {x} has the symbol")),
}  # fmt: skip
